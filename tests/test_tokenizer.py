"""Tokenizer against an independent reimplementation of OpenAI CLIP's simple_tokenizer BPE."""
import gzip
import html
import json

import pytest
import regex

from model.tokenizer import Tokenizer
from tests.clip_vocab import clip_bpe_gz_path, real_clip_vocab_folder

PROMPTS = [
    "a photo of a cat",
    "a photograph of an astronaut riding a horse",
    "Pneumonoultramicroscopic silicovolcanoconiosis",
    "a bowl of quinoa with kumquats and gochujang",
    "an axolotl  wearing\ta   fedora, watercolor",
    "a cat's whiskers... in 3000 AD!!",
    "café naïve façade",
    "",
]


class ReferenceCLIPBPE:
    """OpenAI CLIP's tokenizer (clip/simple_tokenizer.py) written out from the paper code's algorithm.

    Deliberately shares nothing with model/tokenizer.py or transformers. ftfy.fix_text is left out:
    it is the identity on the NFC, mojibake-free prompts above.
    """

    def __init__(self, bpe_gz):
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        self.byte_encoder = dict(zip(bs, map(chr, cs)))
        merges = gzip.open(bpe_gz).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {v: i for i, v in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                 regex.IGNORECASE)

    def bpe(self, token):
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = tuple(out)
        return list(word)

    def pieces(self, text):
        text = html.unescape(html.unescape(text)).strip()
        text = " ".join(text.split()).lower()
        out = []
        for tok in self.pat.findall(text):
            out += self.bpe("".join(self.byte_encoder[b] for b in tok.encode("utf-8")))
        return out

    def ids(self, text):
        return [self.encoder[p] for p in self.pieces(text)]


@pytest.fixture(scope="module")
def vocab_folder(tmp_path_factory):
    return real_clip_vocab_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def tok(vocab_folder):
    return Tokenizer.from_folder(vocab_folder)


@pytest.fixture(scope="module")
def ref(vocab_folder):
    return ReferenceCLIPBPE(clip_bpe_gz_path())


def test_vocab_files(vocab_folder):
    vocab = json.loads((vocab_folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["a</w>"] == 320 and vocab["cat</w>"] == 2368
    assert sorted(vocab.values()) == list(range(49408))


def test_known_ids(tok):
    ids = tok.encode(["a photo of a cat"])
    assert ids.dtype.is_floating_point is False and ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (49406, 49407, 49407)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_match_reference(tok, ref, prompt):
    want = [49406] + ref.ids(prompt) + [49407]
    got = tok.encode([prompt])[0].tolist()
    assert got[:len(want)] == want
    assert got[len(want):] == [tok.pad_id] * (77 - len(want))
    assert tok.tokens(prompt) == ref.pieces(prompt)


def test_reference_splits_rare_words(ref):
    # guards the test itself: the prompts above do exercise multi-piece words
    assert len(ref.pieces("pneumonoultramicroscopic")) > 3
    assert len(ref.pieces("axolotl")) >= 2 and len(ref.pieces("gochujang")) >= 2


def test_batch_padding(tok):
    ids = tok.encode(["a cat", "a photograph of an astronaut riding a horse"])
    assert ids.shape == (2, 77)
    assert ids[:, 0].tolist() == [tok.bos_id] * 2
    assert ids[0, 3] == tok.eos_id and (ids[0, 4:] == tok.pad_id).all()
    assert ids[1, 9] == tok.eos_id and (ids[1, 10:] == tok.pad_id).all()


def _assert_positions_follow_the_pieces(tok, ref, prompt, words):
    """Each word's positions are its reference BPE pieces, in order from SOT + 1, and EOT follows the last."""
    ids = tok.encode([prompt])[0].tolist()
    pos = 1
    for word, positions in words:
        want = ref.ids(word)
        assert positions == list(range(pos, pos + len(want))), word
        assert [ids[p] for p in positions] == want, word
        pos += len(want)
    assert ids[pos] == tok.eos_id


def test_bpe_words_group_multi_token_words(tok, ref):
    prompt = "a red axolotl and pneumonoultramicroscopic dust, please"
    words = tok.words(prompt, split="bpe")
    assert [w for w, _ in words] == ["a", "red", "axolotl", "and", "pneumonoultramicroscopic", "dust", ",", "please"]
    _assert_positions_follow_the_pieces(tok, ref, prompt, words)
    assert len(dict(words)["pneumonoultramicroscopic"]) == len(ref.pieces("pneumonoultramicroscopic"))


@pytest.mark.parametrize("prompt", ["a red t-shirt", "a ping-pong table, please", "a Shih-Tzu dog,",
                                    "an axolotl  wearing\ta   fedora, watercolor", "a cat's whiskers... in 3000 AD!!"])
def test_words_are_space_separated(tok, ref, prompt):
    # the authors' words: edit.split(" "); each word's positions are its BPE pieces, in order
    words = tok.words(prompt)
    assert [w for w, _ in words] == prompt.split()
    _assert_positions_follow_the_pieces(tok, ref, prompt, words)


def test_space_words_hyphen_and_comma_are_one_word(tok):
    words = dict(tok.words("a Shih-Tzu in a t-shirt, ping-pong"))
    assert len(words["Shih-Tzu"]) >= 3 and len(words["t-shirt,"]) == 4 and len(words["ping-pong"]) == 3
    assert [w for w, _ in tok.words("a t-shirt", split="bpe")] == ["a", "t", "-", "shirt"]
    with pytest.raises(ValueError, match="split 'x'"):
        tok.words("a", split="x")


def test_words_non_ascii(tok):
    assert [w for w, _ in tok.words("café naïve")] == ["café", "naïve"]


def test_truncation_warns(tok):
    with pytest.warns(UserWarning, match="100 tokens"):
        ids = tok.encode(["cat " * 100])
    assert ids.shape == (1, 77)
    assert ids[0, 0] == tok.bos_id and ids[0, 76] == tok.eos_id
    assert (ids[0, 1:76] == 2368).all()
    assert len(tok.words("cat " * 100)) == 75


def test_exactly_75_tokens_no_warning(tok, recwarn):
    ids = tok.encode(["cat " * 75])
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
    assert ids[0, 76] == tok.eos_id and (ids[0, 1:76] == 2368).all()
