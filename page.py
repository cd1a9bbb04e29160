#!/usr/bin/env python3
"""A local web page to try an edit and see why it works: upload an image, type the edit, watch the mask.

    pip install -r requirements-page.txt      # Gradio: an optional extra, the core does not need it
    python page.py                            # the bundled toy model, offline: http://127.0.0.1:7860
    python page.py --model CompVis/stable-diffusion-v1-4 --device cuda --port 7861

The page is a face of the command line, not a second implementation. Its controls are built from the
option specs (methods/options.py: ranges, defaults, choices); each click turns them into the CLI's
arguments and runs the CLI's own `main` into a fresh output folder, so the checks, the pipeline, the
figures and run.json are the CLI's, and bad input shows the CLI's one-line `error:` in the page.
Flags this script does not know (--model, --inpaint-model, --device, --dtype, --guidance, ...) are
passed to every edit as they are; --model defaults to the toy model here.
"""
from __future__ import annotations

import argparse
import contextlib
import contextvars
import io
import json
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import instdiffedit
from evaluation.figures import steps_strip, strip_masks
from images import load_image
from methods import REGISTRY, EditError, Option
from methods.options import SHARED_BY_NAME
from weights.sources import assets_dir

EXAMPLE = assets_dir() / "examples" / "scene.png"
# The page's controls: (option, label). Everything else keeps the CLI's default or the page's flags.
CONTROLS = (("strength", "r: noise strength"), ("threshold", "phi: mask threshold"), ("rounds", "rounds n"),
            ("steps", "steps"), ("seed", "seed"))
# What the CLI writes, in the order the page shows it; a picture missing from a run is shown empty.
PICTURES = ("edited.png", "overlay.png", "soft_mask.png", "attention.png", "steps.png")
KEEP_RUNS = 8  # output folders of earlier clicks kept for their downloads; older ones are removed


def control(gr, spec: Option, label: str):
    """A Gradio control from an option's spec: a slider over a finite float range, else a number box.
    Number boxes get no min/max of their own, so an out-of-range value reaches the CLI's check and
    shows the CLI's message; the range is written under the box."""
    info = f"{spec.help}; in {spec.range_text()}"
    if spec.type is float and spec.min is not None and spec.max is not None:
        return gr.Slider(spec.min, spec.max, value=spec.default, step=0.01, label=label, info=info,
                         elem_id=f"opt-{spec.name}")
    return gr.Number(value=spec.default, precision=0 if spec.type is int else None, label=label, info=info,
                     elem_id=f"opt-{spec.name}")


def cli_argv(image: str | None, edit: str, method: str, source: str, values: dict, out: Path,
             flags: list[str]) -> list[str]:
    """The page's values as the CLI's arguments (`--flag=value`, so a negative number stays a value).
    A box left empty is left out: the CLI's default applies, as when the flag is not given."""
    argv = ([f"--image={image}"] if image else []) + [f"--edit={edit}", f"--method={method}", f"--out={out}",
                                                      "--save-attention", "--save-steps", "--overwrite", *flags]
    if source:
        argv.append(f"--source={source}")
    for name, value in values.items():
        spec = SHARED_BY_NAME[name]
        if value is not None:  # an int option's 3.0 is 3; 2.5 stays 2.5, for the CLI to refuse
            argv.append(f"{spec.cli_flag}={int(value) if spec.type is int and float(value).is_integer() else value}")
    return argv


def run_cli(argv: list[str], session: instdiffedit.Session) -> tuple[int, list[str]]:
    """The CLI's main on `argv`: its exit code and what it said on stderr (warnings, the error line).
    An argparse error (a missing --image, a value that is not a number) exits; its message is kept."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):  # "wrote ...": the page shows it
        try:
            code = instdiffedit.main(argv, session)
        except SystemExit as e:  # argparse: usage line, then "instdiffedit.py: error: ..."
            code = e.code if isinstance(e.code, int) else 2
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip() and not ln.startswith("usage:")
             and not ln.startswith(" ")]
    return code, [ln.removeprefix(f"{instdiffedit.build_parser().prog}: ") for ln in lines]


class Page:
    """One page server: the fixed CLI flags, the CLI session that keeps the models loaded between clicks,
    and a folder of per-click output folders."""

    def __init__(self, flags: list[str]):
        self.flags = flags
        self.session = instdiffedit.Session()
        self.root = Path(tempfile.mkdtemp(prefix="instdiffedit-page-"))  # runs/ (one folder per click), examples/
        (self.root / "runs").mkdir()

    def edit(self, image, edit, method, source, *values, on_step=None):
        """One click: run the CLI into a fresh folder; return the status line, the pictures, the words
        with their P, and the downloads (a zip of the outputs, run.json). on_step: the step callback."""
        out = self._fresh()
        argv = cli_argv(image, edit or "", method, source or "", dict(zip([n for n, _ in CONTROLS], values)),
                        out / "out", self.flags)
        tic = time.perf_counter()
        self.session.on_step = on_step
        code, said = run_cli(argv, self.session)
        empty = (None,) * len(PICTURES) + ("", None, None)
        if code != 0:
            line = next((ln for ln in reversed(said) if ln.startswith("error:")), f"error: exit status {code}")
            return (line.replace(str(image), Path(image).name) if image else line, *empty)
        res = out / "out"
        record = json.loads((res / "run.json").read_text())
        pictures = tuple(str(res / n) if (res / n).is_file() else None for n in PICTURES)
        words = "\n".join(f"| `{w}` | {p:+d} |" for w, p in zip(record.get("words", []), record.get("P", [])))
        table = "| word | P (Eq. 8) |\n|---|---|\n" + words if words else "(this method makes no word maps)"
        archive = out / "instdiffedit-outputs.zip"
        with zipfile.ZipFile(archive, "w") as z:
            for f in sorted(res.iterdir()):
                if f.is_file():  # the CLI's outputs are links into its store: their targets are written
                    z.write(f, f.name)
        status = " ".join([*(ln for ln in said if ln.startswith("warning:")),
                           f"done in {time.perf_counter() - tic:.1f} s ({record['unet_evals']} UNet evaluations)"])
        return (status, *pictures, table, str(archive), str(res / "run.json"))

    def _fresh(self) -> Path:
        runs = sorted((self.root / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
        for old in runs[:max(0, len(runs) - KEEP_RUNS + 1)]:
            shutil.rmtree(old, ignore_errors=True)
        return Path(tempfile.mkdtemp(dir=self.root / "runs"))

    def examples(self, n: int = 3) -> list[list[str]]:
        """The bundled scene and, in a checkout (toy/ is not installed), `n` held-out toy benchmark scenes,
        each with an edit text."""
        rows = [[str(EXAMPLE), "a blue circle"]]
        try:
            from toy.world import BENCHMARK_SEED, KINDS, make_edit_case, render
        except ImportError:
            return rows
        from PIL import Image
        folder = self.root / "examples"
        folder.mkdir(exist_ok=True)
        for i in range(n):
            case = make_edit_case(BENCHMARK_SEED + i, KINDS[i % len(KINDS)], size=256)
            path = folder / f"toy-scene-{i}.png"
            Image.fromarray(render(case.scene, 256)[0]).save(path)
            rows.append([str(path), case.edit_text])
        return rows


def build(page: Page):
    import gradio as gr

    with gr.Blocks(title="InstDiffEdit") as demo:
        gr.Markdown("## InstDiffEdit: edit an image with a text; the mask comes from the model's own attention\n"
                    "The words of the edit text whose attention map resembles the object's (P = +1) build the "
                    "mask, those that resemble the rest of the image (P = -1) are subtracted (Eq. 6-9).")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", label="image", elem_id="input-image", height=256,
                                 sources=["upload", "clipboard"])
                edit = gr.Textbox(label="edit text", placeholder="a blue circle", elem_id="edit")
                method = gr.Dropdown(list(REGISTRY), value="instdiffedit", label="method", elem_id="method")
                with gr.Accordion("the methods", open=False):
                    gr.Markdown("\n".join(f"- **{n}**: {m.help}" for n, m in REGISTRY.items()))
                needs = ", ".join(n for n, m in REGISTRY.items() if m.needs_source)
                source = gr.Textbox(label=f"source text: what the image shows (needed by {needs})", elem_id="source")
                values = [control(gr, SHARED_BY_NAME[name], label) for name, label in CONTROLS]
                go = gr.Button("edit", variant="primary", elem_id="run")
                gr.Examples(page.examples(), [image, edit], label="toy scenes")
            with gr.Column(scale=2):
                status = gr.Textbox(label="status", interactive=False, elem_id="status")
                with gr.Row():
                    result = gr.Image(label="result", elem_id="result", interactive=False)
                    overlay = gr.Image(label="mask over the image", elem_id="mask", interactive=False)
                    soft = gr.Image(label="soft mask", elem_id="soft-mask", interactive=False)
                attention = gr.Image(label="each word's attention map and its P", elem_id="attention",
                                     interactive=False)
                steps = gr.Image(label="the soft mask at every step", elem_id="steps", interactive=False)
                table = gr.Markdown(elem_id="words")
                with gr.Row():
                    archive = gr.File(label="all outputs (zip)", elem_id="download")
                    record = gr.File(label="run.json", elem_id="run-json")

        # Gradio finds its Progress among the positional parameters only (not after *inputs); with
        # track_tqdm it shows the pipeline's own progress bars (the CLI's, without --quiet) in the page
        def run(progress=gr.Progress(track_tqdm=True), image=None, *inputs):
            """The edit in a worker thread; meanwhile the mask of every step so far, as the steps strip."""
            path = image["path"] if image else None
            yield ("", *[None] * 5, "", None, None)  # the last click's pictures go: what follows is this one's
            live: queue.Queue = queue.Queue()

            def on_step(step, t, state):
                drawn = strip_masks(state)
                if drawn is not None:
                    live.put(drawn)

            done: list = []

            def work():
                try:
                    done.append(page.edit(path, *inputs, on_step=on_step))
                except BaseException as e:  # a bug: shown by Gradio, as any exception of the handler
                    done.append(e)
            # the progress bars follow Gradio's context variable into the thread
            worker = threading.Thread(target=contextvars.copy_context().run, args=(work,))
            worker.start()
            picture, softs, masks, shown = None, [], [], 0
            while worker.is_alive():
                worker.join(timeout=0.5)  # at most two pictures a second
                while not live.empty():
                    soft, mask = live.get()
                    softs.append(soft)
                    masks.append(mask)
                if len(softs) > shown and worker.is_alive():
                    shown = len(softs)
                    picture = picture or load_image(path)  # the CLI has read it already
                    yield (f"step {len(softs)}: the mask so far", *[gr.skip()] * 4, steps_strip(picture, softs, masks),
                           *[gr.skip()] * 3)
            if isinstance(done[0], BaseException):
                raise done[0]
            yield done[0]

        # preprocess=False: the values as the browser sent them (the upload checked and in Gradio's cache,
        # undecoded), so the CLI decodes the image with its own checks and messages, and checks the numbers
        go.click(run, [image, edit, method, source, *values],
                 [status, result, overlay, soft, attention, steps, table, archive, record], preprocess=False,
                 show_progress_on=[status])  # the bars over the status line; the strip stays visible
    return demo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="page.py", description=__doc__.split("\n\n")[0],
                                epilog="Any other flag is one of instdiffedit.py's, used for every edit.")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    args, flags = p.parse_known_args(argv)
    if not any(f == "--model" or f.startswith("--model=") for f in flags):
        flags = ["--model", "toy", *flags]
    def refuse(message: str):  # argparse's error() exits; here it becomes the one-line error below
        raise EditError(message)
    try:  # the CLI's parser checks the page's flags once, before serving
        check = instdiffedit.build_parser()
        check.error = refuse
        check.parse_args(["--image", str(EXAMPLE), "--edit", "x", *flags])
        import gradio  # noqa: F401
    except EditError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError:
        print("error: the page needs Gradio: pip install -r requirements-page.txt", file=sys.stderr)
        return 2
    page = Page(flags)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a stop (SIGTERM), like Ctrl-C, removes page.root
    try:
        demo = build(page)
        demo.queue(default_concurrency_limit=1)  # one edit at a time: one model, one device
        demo.launch(server_name=args.host, server_port=args.port, allowed_paths=[str(page.root)])  # until Ctrl-C
    finally:
        shutil.rmtree(page.root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
