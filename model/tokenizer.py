"""CLIP BPE tokenizer for the SD v1.x text encoder, plus word <-> token-position bookkeeping.

Tokenisation itself is transformers' ``CLIPTokenizer`` (a byte-level BPE with a ``</w>`` end-of-word
suffix, after OpenAI CLIP's ``simple_tokenizer.py``); this file only frames the ids the way Stable
Diffusion feeds them (start token, at most 75 prompt tokens, end token, padding to 77) and maps each
prompt word (a space-separated word, as the InstDiffEdit authors count words) to the sequence positions of
its BPE pieces, which InstDiffEdit's mask code needs to merge the cross-attention maps of a word that
CLIP split into several tokens.

``write_clip_vocab`` rebuilds ``vocab.json`` + ``merges.txt`` from OpenAI's
``bpe_simple_vocab_16e6.txt.gz`` (shipped in the ``open-clip-torch`` wheel) exactly as
https://github.com/openai/CLIP/blob/main/clip/simple_tokenizer.py builds its vocabulary, so tests can
run on the real 49408-token vocabulary without downloading a checkpoint.
"""
from __future__ import annotations

import gzip
import json
import warnings
from functools import lru_cache
from pathlib import Path

import torch

END_OF_WORD = "</w>"


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """OpenAI/GPT-2 reversible byte -> printable unicode char table (dict order is the vocab order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            # bytes that would be whitespace/control chars get shifted past 255 so BPE never sees them raw
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_vocab(bpe_gz_path: str | Path, out_folder: str | Path) -> Path:
    """Turn OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` into a ``CLIPTokenizer`` folder; returns the folder.

    Vocabulary order is OpenAI's: 256 byte chars, the same with ``</w>``, the first 48894 merges
    joined, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407): 49408 entries in all.
    """
    lines = gzip.open(bpe_gz_path).read().decode("utf-8").split("\n")
    # line 0 is a version header; CLIP keeps only the merges that fit a 49152-entry vocab minus specials
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + END_OF_WORD for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False),
                                    encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                    encoding="utf-8")
    return out


class Tokenizer:
    """Stable Diffusion's prompt framing around a transformers ``CLIPTokenizer``."""

    def __init__(self, clip_tokenizer, max_length: int = 77):
        self.tok = clip_tokenizer
        self.max_length = max_length  # the text encoder's position-embedding count
        self.bos_id = self.tok.bos_token_id
        self.eos_id = self.tok.eos_token_id
        # SD v1 tokenizers pad with <|endoftext|>; some later ones pad with "!" (id 0), so ask the tokenizer
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id
        self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}

    @classmethod
    def from_folder(cls, path: str | Path, max_length: int = 77) -> "Tokenizer":
        """Load a ``tokenizer/`` folder: ``vocab.json`` + ``merges.txt`` (SD v1 repos) or ``tokenizer.json``
        (what current transformers and diffusers save), either with ``tokenizer_config.json``."""
        from transformers import CLIPTokenizer
        return cls(CLIPTokenizer.from_pretrained(str(path)), max_length=max_length)

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def _body(self, prompt: str) -> tuple[list[int], int]:
        """The prompt's BPE ids cut to fit between start and end tokens, and the uncut count."""
        ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
        return ids[: self.max_length - 2], len(ids)

    def encode(self, prompts: list[str] | str) -> torch.Tensor:
        """(B, max_length) int64 ids: start, prompt tokens, end, then padding."""
        if isinstance(prompts, str):
            prompts = [prompts]
        rows = []
        for p in prompts:
            body, n = self._body(p)
            if n > len(body):
                warnings.warn(f"prompt has {n} tokens, more than the {self.max_length - 2} that fit; "
                              f"truncated: {p[:80]!r}", stacklevel=2)
            row = [self.bos_id] + body + [self.eos_id]
            rows.append(row + [self.pad_id] * (self.max_length - len(row)))
        return torch.tensor(rows, dtype=torch.long)

    def tokens(self, prompt: str) -> list[str]:
        """BPE token strings of the (truncated) prompt; ``tokens(p)[i]`` sits at sequence position i + 1."""
        return self.tok.convert_ids_to_tokens(self._body(prompt)[0])

    def words(self, prompt: str, split: str = "space") -> list[tuple[str, list[int]]]:
        """The prompt's words, each with the sequence positions (0 = start token) of its BPE pieces.

        ``split="space"`` (default, the authors' ``edit.split(" ")``): a word is a space-separated
        word of the text, so ``t-shirt``, ``Shih-Tzu`` and ``dog,`` are one word each, whatever
        CLIP's pre-tokeniser cuts them into. ``split="bpe"``: CLIP's own words, where a word ends at
        the first piece carrying ``</w>`` and punctuation is a word of its own. Either way a word cut
        by truncation keeps the positions that fit, and words past the cut are dropped.
        """
        if split not in ("space", "bpe"):
            raise ValueError(f"split '{split}' is not one of space, bpe")
        if split == "space":
            kept = len(self._body(prompt)[0])
            counts = [len(self.tok(w, add_special_tokens=False)["input_ids"]) for w in prompt.split()]
            # CLIP's pre-tokeniser never joins across whitespace, so the counts add up; if text
            # cleaning ever changed that, the BPE words below are the safe answer
            if sum(counts) == self._body(prompt)[1]:
                out, start = [], 1
                for word, count in zip(prompt.split(), counts):
                    positions = [p for p in range(start, start + count) if p <= kept]
                    if positions:
                        out.append((word, positions))
                    start += count
                return out
        out: list[tuple[str, list[int]]] = []
        pieces: list[str] = []
        positions: list[int] = []
        for i, tok in enumerate(self.tokens(prompt)):
            pieces.append(tok)
            positions.append(i + 1)
            if tok.endswith(END_OF_WORD):
                out.append((self._to_text(pieces), positions))
                pieces, positions = [], []
        if pieces:
            out.append((self._to_text(pieces), positions))
        return out

    def _to_text(self, pieces: list[str]) -> str:
        s = "".join(pieces).replace(END_OF_WORD, "")
        return bytes(self._byte_decoder[c] for c in s).decode("utf-8", errors="replace")
