"""The method registry (methods/): option specs and their validation, the counted UNet calls, DiffEdit as
the InstDiffEdit authors ran it against an independent diffusers + OpenCV recomputation, and the README's
"How to add a method" example registered and run through the CLI parser and pipe.edit."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import instdiffedit
from images import to_tensor
from methods import REGISTRY, EditError, EditOptions, get_method, options_from_args
from methods.options import SEED_MAX, all_specs

RES = 8  # the tiny UNet's cross-attention grid
REPO = Path(__file__).resolve().parents[1]
TINY = {"steps": 4, "attention_res": RES, "rounds": 2, "diffedit_samples": 3}

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The configuration file of this scheduler:FutureWarning"),
]


def _pil(seed: int = 0, size=(16, 16)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), "RGB").resize(size, Image.BILINEAR)


def _for(method: str, **extra) -> dict:
    """TINY options that apply to `method`, plus `extra`."""
    specs = get_method(method).option_specs()
    return {**{k: v for k, v in TINY.items() if k in specs}, **extra}


# ---------------------------------------------------------------- 1. options from the specs

@pytest.mark.parametrize("bad,words", [
    ({"guidance": float("nan")}, "guidance nan is not a finite number"),
    ({"guidance": float("inf")}, "guidance inf is not a finite number"),
    ({"guidance": -1e30}, "guidance -1e+30 is outside [0, 100]"),
    ({"strength": 0.0}, "strength 0.0 is outside (0, 1]"),
    ({"threshold": 1.5}, "threshold 1.5 is outside [0, 1]"),
    ({"rounds": 0}, "rounds 0 is outside [1, 1024]"),
    ({"steps": 2.5}, "steps 2.5 is not an integer"),
    ({"steps": True}, "steps True is not a number"),
    ({"seed": 2**64}, f"seed {2**64} is outside [0, {SEED_MAX}]"),
    ({"seed": -1}, "seed -1 is outside"),
    ({"sampler": "euler"}, "sampler 'euler' is not one of lms, ddim"),
    ({"attention": "instant"}, "attention 'instant' is not one of running, last"),
    ({"gamma1": float("nan")}, "gamma1 nan is not a finite number"),
    ({"steps": 2, "strength": 0.2}, "leaves no step to run"),
    ({"diffedit_samples": 3}, "option 'diffedit_samples' does not apply to method instdiffedit (it is an option of diffedit"),
    ({"nope": 1}, "option 'nope' does not apply to method instdiffedit"),
])
def test_bad_options_are_one_line_errors_naming_option_and_value(bad, words):
    with pytest.raises(EditError) as e:
        EditOptions("instdiffedit", **bad)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_seed_range_is_what_torch_generator_accepts():
    for seed in (0, SEED_MAX):  # both ends work as seeds
        torch.Generator().manual_seed(EditOptions(seed=seed).seed)
    with pytest.raises((RuntimeError, ValueError)):
        torch.Generator().manual_seed(SEED_MAX + 1)  # the first value we refuse, torch refuses too


def test_method_defaults_override_shared_defaults_and_unknown_method_is_refused():
    assert EditOptions("instdiffedit").threshold == 0.2 and EditOptions("diffedit").threshold == 0.3
    assert EditOptions("diffedit", threshold=0.5).threshold == 0.5
    with pytest.raises(EditError, match="method 'magic' is not one of instdiffedit"):
        EditOptions("magic")


def test_steps_beyond_the_models_timesteps_are_refused(pipe):
    n = pipe.scheduler_config.num_train_timesteps
    with pytest.raises(EditError, match=f"steps {n + 1} is more than the model's {n} training timesteps"):
        pipe.edit(_pil(), "a cat", steps=n + 1)


def _parsers():
    import evaluation.run
    import toy.benchmark
    return {"instdiffedit.py": (instdiffedit.build_parser(), ["--image", "x", "--edit", "y"]),
            "evaluation.run": (evaluation.run.build_parser(), ["--list", "l", "--images", "i", "--out", "o"]),
            "toy.benchmark": (toy.benchmark.build_parser(), [])}


@pytest.mark.parametrize("front", ["instdiffedit.py", "evaluation.run", "toy.benchmark"])
def test_every_option_of_every_method_is_a_flag_of_every_command_line(front):
    parser, required = _parsers()[front]
    argv = list(required)
    expect = {}
    for spec in all_specs().values():  # a non-default value for every option
        if spec.type is bool:
            argv.append(spec.cli_flag)
            expect[spec.name] = not spec.default
        else:
            top = spec.max if spec.max is not None else (spec.min or 0) + 1
            value = spec.choices[-1] if spec.choices else "some text" if spec.type is str else top
            argv += [spec.cli_flag, str(value)]
            expect[spec.name] = value if spec.type is str else spec.type(value)
    args = parser.parse_args(argv)
    assert options_from_args(args) == expect
    assert options_from_args(parser.parse_args(required)) == {}  # nothing given: the methods' defaults apply


def test_cli_bad_option_is_one_line_before_loading(tmp_path, capsys, monkeypatch):
    _pil().save(tmp_path / "in.png")
    monkeypatch.setattr(instdiffedit.InstDiffEdit, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    for argv, words in ((["--guidance", "nan"], "error: guidance nan is not a finite number"),
                        (["--seed", str(2**64)], "error: seed 18446744073709551616 is outside"),
                        (["--method", "sdedit", "--diffedit-samples", "2"], "does not apply to method sdedit")):
        rc = instdiffedit.main(["--image", str(tmp_path / "in.png"), "--edit", "a cat", "--out",
                                str(tmp_path / "o"), *argv])
        err = capsys.readouterr().err
        assert rc == 2 and words in err and err.count("\n") == 1, err


# ---------------------------------------------------------------- 2. dispatch and refusals

def test_mask_dispatches_on_the_method_or_refuses(pipe):
    img = _pil(1)
    ours = pipe.mask(img, "a cat", method="diffedit", source="a dog", **_for("diffedit"))
    mask_only = pipe.mask(img, "a cat", method="diffedit-mask", source="a dog", **_for("diffedit-mask"))
    inst = pipe.mask(img, "a cat", **_for("instdiffedit"))
    assert ours.words == [] and ours.latents is None and inst.words == ["<sot>", "a", "cat", "<eot>"]
    assert ours.unet_evals != mask_only.unet_evals  # different methods ran, not one ignoring `method`
    with pytest.raises(EditError, match="method sdedit makes no mask"):
        pipe.mask(img, "a cat", method="sdedit", steps=4)


def test_methods_needing_a_source_text_refuse_without_one(pipe):
    for name, m in REGISTRY.items():
        if m.needs_source:
            with pytest.raises(EditError, match=f"method {name} needs the text of what the image shows"):
                pipe.edit(_pil(), "a cat", method=name, **_for(name))
    assert get_method("diffedit").needs_source and not get_method("instdiffedit").needs_source


def test_no_inpaint_and_user_mask_are_refused_where_they_mean_nothing(pipe):
    with pytest.raises(EditError, match="it needs the instdiffedit method"):
        pipe.edit(_pil(), "a cat", method="diffedit", source="a dog", inpaint=False, **_for("diffedit"))
    with pytest.raises(EditError, match="sdedit edits the whole image and takes no mask"):
        pipe.edit(_pil(), "a cat", method="sdedit", mask=torch.ones(16, 16, dtype=torch.bool), steps=4)


# ---------------------------------------------------------------- 3. counted UNet evaluations

class CountingUNet(torch.nn.Module):
    """Independent count: wraps a UNet and adds up the batch rows it actually runs."""

    def __init__(self, unet):
        super().__init__()
        self.inner, self.rows, self.config = unet, 0, unet.config

    def forward(self, sample, *args, **kwargs):
        self.rows += sample.shape[0]
        return self.inner(sample, *args, **kwargs)

    def __getattr__(self, name):  # layers a method looks up by name (PnP: up_blocks) are the wrapped UNet's
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_unet_evals_equal_the_rows_the_unets_ran(pipe, monkeypatch, method):
    unet, inpaint = CountingUNet(pipe.unet), CountingUNet(pipe.inpaint_unet)
    monkeypatch.setattr(pipe, "unet", unet)
    monkeypatch.setattr(pipe, "inpaint_unet", inpaint)
    res = pipe.edit(_pil(2), "a red cat", method=method, source="a grey dog", **_for(method))
    assert unet.rows > 0 and res.unet_evals == unet.rows + inpaint.rows
    assert res.unet_evals_by_model == {k: v for k, v in (("unet", unet.rows), ("inpaint_unet", inpaint.rows)) if v}
    # and what the methods' descriptions say they cost: 4 steps, strength 0.5 -> 2 steps, CFG doubles rows
    expected = {"instdiffedit": 2 * 2 * 2 + 4 * 2,            # rounds x CFG x steps + the finish
                "diffedit": 3 * 2 * 2 * 2 + 4 * 2,            # samples x prompts x CFG x steps + the finish
                "diffedit-mask": 3 * 2 * 2 + 4 * 2,           # samples x prompts x CFG, one step + the finish
                "diffedit-original": 3 * 2 * 2 + 2 * 3 + 2 * 3,  # the same mask, then CFG x int(4 x 0.8) steps
                                                              # inverted and decoded, no finish
                "sdedit": 2 * 2,                              # CFG x steps, no finish
                "cyclediffusion": 2 * (1 + 2),                # int(4 x 0.7) steps x (source at guidance 1 + CFG edit)
                "ptp": 4 + 4 * 2 * 2,                         # inversion (guidance 1, a row a step), [src, edit] x CFG
                "pnp": 999 + 4 * 3,                           # 999-step inversion, then [source, uncond, cond] a step
                "ledits": 4 + 4 * (1 + 2)}                    # inversion, then [uncond, edit, source (removed)] a step
    assert method in expected, f"{method}: add what its description says it costs here"
    assert res.unet_evals == expected[method]


# ---------------------------------------------------------------- 4. DiffEdit as the authors ran it

def test_diffedit_paper_mask_matches_opencv_on_given_predictions():
    cv2 = pytest.importorskip("cv2")
    from mask.diffedit import diffedit_paper_mask
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 4, 12, 10, generator=g), torch.randn(4, 4, 12, 10, generator=g)
    b[:, :, 3:8, 2:6] += 2.0  # a region where the prompts disagree
    res = diffedit_paper_mask(a, b, threshold=0.3)
    m = np.sqrt(((a - b).numpy() ** 2).sum(1)).mean(0)
    m = ((m - m.min()) / (m.max() - m.min()) * 255).astype(np.uint8)
    ref = cv2.GaussianBlur(m.astype(np.float32), (5, 5), 1)
    assert np.abs(res.soft.numpy() * 255 - ref).max() < 1e-3
    assert np.array_equal(res.mask.numpy(), ref > 255 * 0.3) and 0 < res.mask.sum() < res.mask.numel()


def test_diffedit_paper_equals_a_straightforward_diffusers_recomputation(pipe, tiny_sd):
    """Per sample and per prompt, the whole denoising with diffusers' LMSDiscreteScheduler and UNet (the
    authors' loop, one sample at a time); the last guided predictions; L2, mean, min-max, uint8,
    cv2.GaussianBlur(5x5, 1), threshold. Our batched run must give the same mask."""
    cv2 = pytest.importorskip("cv2")
    from transformers import CLIPTokenizer

    from tests.test_sampler import LMSDiscreteScheduler  # installs the scipy.quad shim

    unet, vae, clip = tiny_sd.refs
    n, steps, strength, guidance, seed = 3, 6, 0.5, 7.5, 21
    img, source, edit = _pil(5), "a grey dog", "a red cat"
    ours = pipe.mask(img, edit, method="diffedit", source=source, steps=steps, diffedit_samples=n, seed=seed)

    tok = CLIPTokenizer.from_pretrained(str(tiny_sd.vocab), model_max_length=77)

    def embed(text):
        ids = tok([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return clip(ids)[0]

    with torch.no_grad():
        x0 = to_tensor(img, pipe.size, "cpu", torch.float32)
        z0 = vae.encode(x0).latent_dist.mean * vae.config.scaling_factor
        noise = torch.randn((n, *z0.shape[1:]), generator=torch.Generator().manual_seed(seed))
        uncond = embed("")
        sched = LMSDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        diffs = []
        for k in range(n):
            last = []
            for text in (source, edit):
                sched.set_timesteps(steps)
                t_start = steps - int(steps * strength)
                ts = sched.timesteps[t_start:]
                lat = sched.add_noise(z0, noise[k:k + 1], ts[:1])
                ctx = torch.cat([uncond, embed(text)])
                for t in ts:
                    inp = sched.scale_model_input(torch.cat([lat, lat]), t)
                    u, c = unet(inp, t, encoder_hidden_states=ctx).sample.chunk(2)
                    pred = u + guidance * (c - u)
                    lat = sched.step(pred, t, lat).prev_sample
                last.append(pred)
            diffs.append((last[0] - last[1])[0].pow(2).sum(0).sqrt())
    m = torch.stack(diffs).mean(0).numpy()
    m = ((m - m.min()) / (m.max() - m.min()) * 255).astype(np.uint8)
    ref = cv2.GaussianBlur(m.astype(np.float32), (5, 5), 1)
    assert np.abs(ours.soft_latent.numpy() * 255 - ref).max() <= 1.0 + 1e-3  # at most one 8-bit step apart
    assert (ours.mask_latent.numpy() != (ref > 255 * 0.3)).sum() == 0
    assert 0 < ours.mask_latent.sum() < ours.mask_latent.numel()  # not a trivial mask
    assert ours.unet_evals == n * 2 * 2 * (steps - int(steps * strength))


# ---------------------------------------------------------------- 5. the README's "How to add a method"

def _readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## How to add a method", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def example_method():
    """The README's example module, registered for this test only."""
    before = dict(REGISTRY)
    namespace = {"__name__": "methods.example"}
    exec(compile(_readme_example(), "README.md (How to add a method)", "exec"), namespace)
    new = set(REGISTRY) - set(before)
    assert len(new) == 1
    yield new.pop()
    REGISTRY.clear()
    REGISTRY.update(before)


def test_readme_example_method_runs_through_the_cli_parser_and_edit(example_method, pipe, tiny_sd, tmp_path, capsys):
    m = get_method(example_method)
    assert len(_readme_example().strip().splitlines()) <= 25 and m.options
    own = m.options[0]
    parser = instdiffedit.build_parser()  # built after registration: the new method and its flag are there
    args = parser.parse_args(["--image", "x", "--edit", "a red cat", "--method", example_method,
                              own.cli_flag, "0.5", "--steps", "4"])
    given = options_from_args(args)
    assert given == {own.name: 0.5, "steps": 4}
    res = pipe.edit(_pil(3), args.edit, method=args.method, **given)
    assert res.unet_evals > 0 and res.image.size == (16, 16)
    mo = pipe.mask(_pil(3), args.edit, method=args.method, **given)
    assert mo.mask_latent.dtype == torch.bool and mo.mask_latent.any()
    with pytest.raises(EditError, match=f"{own.name} 2.0 is outside"):
        pipe.edit(_pil(3), "a red cat", method=example_method, **{own.name: 2.0})
    # and the whole command line, end to end
    _pil(3).save(tmp_path / "in.png")
    rc = instdiffedit.main(["--image", str(tmp_path / "in.png"), "--edit", "a red cat", "--out", str(tmp_path / "o"),
                            "--model", str(tiny_sd.sd), "--inpaint-model", str(tiny_sd.inpaint), "--device", "cpu",
                            "--quiet", "--method", example_method, "--steps", "4"])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "o" / "edited.png").is_file()


# ---------------------------------------------------------------- 6. the dataset runner and the toy benchmark

def test_dataset_runner_takes_method_options_and_records_unet_evals(tiny_sd, tmp_path, capsys):
    import json

    import evaluation.run
    from evaluation.datasets import parse_list
    lst = tmp_path / "Editing-Mask_list.txt"
    lst.write_text("0 <> a grey dog on grass. <> a grey dog <> a red cat\n")
    (tmp_path / "images").mkdir()
    _pil(4).save(tmp_path / "images" / parse_list(lst)[0].image_file)
    argv = ["--list", str(lst), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "run"),
            "--model", str(tiny_sd.sd), "--inpaint-model", str(tiny_sd.inpaint), "--device", "cpu",
            "--method", "diffedit", "--steps", "4", "--diffedit-samples", "2", "--threshold", "0.4"]
    assert evaluation.run.main(argv) == 0, capsys.readouterr().err
    row = json.loads(next((tmp_path / "run").glob("*/metrics.json")).read_text())
    assert row["unet_evals"] == 2 * 2 * 2 * 2 + 4 * 2  # samples x prompts x CFG x steps + the finish
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["unet_evals"] == row["unet_evals"]
    assert evaluation.run.main(argv[:-2] + ["--threshold", "nan"]) == 2
    assert "error: threshold nan is not a finite number" in capsys.readouterr().err


def test_toy_benchmark_methods_flag_refuses_an_unknown_method_before_loading(tmp_path, capsys):
    import toy.benchmark
    rc = toy.benchmark.main(["--table1", "--methods", "diffedit-original,nope", "--model", str(tmp_path / "absent"),
                             "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err == "error: --methods: 'nope' is not one of " + ", ".join(REGISTRY) + "\n"
    assert not (tmp_path / "out").exists()


def test_toy_benchmark_validates_only_the_methods_it_runs(tmp_path, capsys):
    """--no-inpaint is InstDiffEdit's: with --no-methods no other method runs, so it is not refused for them
    (the run gets as far as loading the absent model, refused in one line); with the comparison on, it is,
    before loading."""
    import toy.benchmark
    absent = ["--model", str(tmp_path / "absent"), "--out", str(tmp_path / "out"), "--no-inpaint"]
    assert toy.benchmark.main(absent + ["--no-methods", "--no-ablation"]) == 2
    assert capsys.readouterr().err.startswith(f"error: model: {tmp_path / 'absent'}: no such file or folder")
    assert toy.benchmark.main(absent) == 2
    assert "--no-inpaint is InstDiffEdit's" in capsys.readouterr().err
