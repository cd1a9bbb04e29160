"""Every option of every editing method, defined once: type, default, range, help.

The API (`pipe.edit(..., **options)`), the three command lines (instdiffedit.py, evaluation.run,
toy.benchmark: `add_arguments`) and the validation (`EditOptions`) all read these specs, so a new
option is one `Option(...)` line: shared ones here, a method's own in its module (`Method.options`).
"""
from __future__ import annotations

import argparse
import math
import operator
from dataclasses import dataclass
from typing import Any

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes [-2**63, 2**64 - 1]; we accept the unsigned range


class EditError(ValueError):
    """Bad user input; the CLI prints the message on one line and exits non-zero."""


@dataclass(frozen=True)
class Option:
    name: str                       # keyword of pipe.edit(); the flag is --name with '-' for '_'
    type: type                      # float, int, str or bool
    default: Any                    # used unless the method (Method.defaults) or the user says otherwise
    help: str                       # one line for --help
    min: float | None = None        # lower bound, inclusive unless min_open
    max: float | None = None        # upper bound, inclusive unless max_open
    min_open: bool = False          # True: the bound itself is refused (strength > 0)
    max_open: bool = False
    choices: tuple[str, ...] | None = None  # allowed values of a str option
    flag: str | None = None         # the CLI flag, when not --name (bools default True: "--no-inpaint")

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def range_text(self) -> str:
        fmt = (lambda v: str(int(v))) if self.type is int else (lambda v: f"{v:g}")
        lo = "-inf" if self.min is None else fmt(self.min)
        hi = "inf" if self.max is None else fmt(self.max)
        return f"{'(' if self.min_open or self.min is None else '['}{lo}, {hi}{')' if self.max_open or self.max is None else ']'}"

    def check(self, value: Any) -> Any:
        """The value converted to the option's type, or a one-line EditError naming option and value."""
        bad = f"{self.name} {value!r}"
        if self.type is bool:
            if not isinstance(value, bool):
                raise EditError(f"{bad} is not True or False")
            return value
        if self.type is str:
            if not isinstance(value, str):
                raise EditError(f"{bad} is not a string")
            if self.choices is not None and value not in self.choices:
                raise EditError(f"{bad} is not one of {', '.join(self.choices)}")
            return value
        if isinstance(value, bool):  # True is an int to Python, never a number to a user
            raise EditError(f"{bad} is not a number")
        if self.type is int:
            try:
                value = operator.index(value)  # ints and numpy ints; 2.5 is refused, not truncated
            except TypeError:
                raise EditError(f"{bad} is not an integer") from None
        else:
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise EditError(f"{bad} is not a number") from None
            if not math.isfinite(value):  # nan / inf would turn the latents into nan: a black image
                raise EditError(f"{bad} is not a finite number")
        if self.min is not None and (value < self.min or (self.min_open and value == self.min)) or \
                self.max is not None and (value > self.max or (self.max_open and value == self.max)):
            raise EditError(f"{bad} is outside {self.range_text()}")
        return value


# Options every method accepts (a method ignores those it has no use for; see its docstring).
SHARED: tuple[Option, ...] = (
    Option("strength", float, 0.5, "noise strength r: the last int(steps * r) steps are run", 0, 1, min_open=True),
    Option("threshold", float, 0.2, "mask threshold phi (Eq. 9)", 0, 1),
    Option("rounds", int, 3, "parallel denoising rounds n whose attention maps are averaged", 1, 1024),
    Option("steps", int, 50, "inference steps of both stages (at most the model's training timesteps)", 1, 10_000),
    Option("guidance", float, 7.5, "classifier-free guidance scale", 0, 100),
    Option("sampler", str, "lms", "scheduler: lms (the authors') or ddim", choices=("lms", "ddim")),
    Option("seed", int, 0, "master seed: all noise is drawn on the CPU from it", 0, SEED_MAX),
    Option("attention", str, "running", "maps averaged over the steps so far (authors) or this step's only",
           choices=("running", "last")),
    Option("attention_res", int, 16, "grid of the cross-attention maps used for the mask (SD v1.x: latent / 4)",
           1, 4096),
    Option("gamma1", float, 0.9, "Eq. 8: similarity at or above which a word joins the mask", -1, 1),
    Option("gamma2", float, 0.6, "Eq. 8: similarity at or below which a word is subtracted", -1, 1),
    Option("inpaint", bool, True, "finish with the SD inpainting UNet (--no-inpaint / False: decode "
           "InstDiffEdit's Eq. 5 result instead)",
           flag="--no-inpaint"),
    Option("source", str, "", "text describing the input image (methods that need one: DiffEdit)"),
    Option("keep_unmasked", bool, False, "paste the original pixels back outside a feathered version of the "
           "final mask, so unmasked regions are truly untouched (diffusers' apply_overlay; beyond the paper)"),
)
SHARED_BY_NAME = {o.name: o for o in SHARED}


class EditOptions:
    """The validated options of one edit: every shared option and the method's own, as attributes.

        EditOptions("instdiffedit", steps=25).threshold   # 0.2; EditOptions("diffedit").threshold: 0.3

    Precedence: given value > the method's default (Method.defaults) > the option's default.
    An option that belongs to another method is refused, so a mistyped flag cannot go unnoticed."""

    def __init__(self, method: str = "instdiffedit", **values):
        from .base import get_method
        self.method = method
        m = get_method(method)
        specs = m.option_specs()
        for key in values:
            if key not in specs:
                other = [n for n, mm in _all_methods().items() if key in {s.name for s in mm.options}]
                where = f" (it is an option of {', '.join(other)})" if other else ""
                raise EditError(f"option '{key}' does not apply to method {method}{where}")
        for name, spec in specs.items():
            value = values[name] if name in values else m.defaults.get(name, spec.default)
            setattr(self, name, spec.check(value))
        self.check()
        if m.samplers is not None and self.sampler not in m.samplers:
            raise EditError(f"sampler {self.sampler!r} does not apply to method {method} "
                            f"(it runs with {', '.join(m.samplers)} only)")
        if not self.inpaint and not m.uses_inpaint:
            raise EditError(f"--no-inpaint is InstDiffEdit's; {method} never inpaints")
        m.check(self)

    def check(self) -> None:
        """Checks across options (each option alone was checked by its spec)."""
        if int(self.steps * self.strength) < 1:
            raise EditError(f"strength {self.strength} x steps {self.steps} leaves no step to run")

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def __repr__(self) -> str:
        return f"EditOptions({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


def _all_methods():
    from .base import REGISTRY
    return REGISTRY


def all_specs() -> dict[str, Option]:
    """Shared options and every registered method's own, by name."""
    specs = dict(SHARED_BY_NAME)
    for m in _all_methods().values():
        specs.update({s.name: s for s in m.options})
    return specs


def _parse(spec: Option):
    def parse(text: str):
        try:
            return spec.type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {'an integer' if spec.type is int else 'a number'}") \
                from None
    return parse


def add_arguments(parser: argparse.ArgumentParser, method_default: str = "instdiffedit",
                  with_method: bool = True) -> None:
    """--method and one flag per option of every registered method. Flags the user does not give stay
    None, so the method's own defaults apply (`options_from_args`)."""
    from .base import REGISTRY
    g = parser.add_argument_group("method and its options (validated per method)")
    if with_method:
        g.add_argument("--method", choices=list(REGISTRY), default=method_default,
                       help="; ".join(f"{n}: {m.help}" for n, m in REGISTRY.items()) + f" (default {method_default})")
    for spec in all_specs().values():
        owners = [n for n, m in REGISTRY.items() if spec in m.options]
        note = f" [{', '.join(owners)}]" if owners else ""
        overrides = [f"{n}: {m.defaults[spec.name]}" for n, m in REGISTRY.items() if spec.name in m.defaults]
        default = f"default {spec.default!r}" + (f"; {'; '.join(overrides)}" if overrides else "")
        if spec.type is bool:
            g.add_argument(spec.cli_flag, dest=spec.name, action="store_const", const=not spec.default,
                           default=None, help=f"{spec.help}{note}")
            continue
        extra = {"choices": spec.choices} if spec.choices else {"type": _parse(spec)} if spec.type is not str else {}
        rng = f"; in {spec.range_text()}" if spec.min is not None or spec.max is not None else ""
        g.add_argument(spec.cli_flag, dest=spec.name, default=None, help=f"{spec.help}{rng}; {default}{note}",
                       **extra)


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The options the user gave on the command line (None = not given), for EditOptions / pipe.edit."""
    return {name: getattr(args, name) for name in all_specs() if getattr(args, name, None) is not None}
