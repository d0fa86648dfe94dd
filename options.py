"""Settings dataclasses <-> command-line flags, so that a default and its help are written once.

Every config dataclass of the project (ModelConfig aside) declares its fields with `option()`:

    window: int = option(256, "window length ℓ in tokens")

and every command line builds its flags from those fields with `add_options`, then turns the
parsed flags back into the dataclass with `from_args`. The default shown by `--help` is therefore
the dataclass default, and the help text lives beside the field it explains (STYLE.md, habit 14).
This file is plumbing, not part of the method; it imports nothing from the project.
"""
from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, field, fields


class UserError(ValueError):
    """Bad input or settings, with a message meant for the user. Every command line prints it on
    one line and exits with status 2; the project's other error classes derive from it."""


def option(default, help: str, choices: tuple | None = None):
    """A dataclass field whose default, help text and allowed values the command lines reuse."""
    return field(default=default, metadata={"help": help, "choices": choices})


def add_options(p: argparse.ArgumentParser, cls, only: tuple[str, ...] | None = None, skip: tuple[str, ...] = ()):
    """One flag per field of `cls` declared with option() (or only those named in `only`)."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if "help" not in f.metadata or f.name in skip or (only is not None and f.name not in only):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()
        kind = hints[f.name]
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f.metadata["help"])
        else:
            if typing.get_origin(kind) is typing.Union:            # Optional[x] -> x
                kind = next(a for a in typing.get_args(kind) if a is not type(None))
            p.add_argument(flag, type=kind, default=default, choices=f.metadata["choices"],
                           help=f"{f.metadata['help']} (default: {default})")


def from_args(cls, args: argparse.Namespace):
    """Build `cls` from the parsed flags; fields without a flag keep their defaults."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def recipe_defaults(argv, recipes: dict[str, dict]) -> dict:
    """The flag values that `--recipe NAME` in argv stands for ({} without it, or for a name the full
    parser will refuse). A parser takes them as its defaults before it parses, so that a flag given
    explicitly still wins: `--recipe study --epochs 5` trains 5 epochs."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe")
    known, _ = pre.parse_known_args(argv)
    return recipes.get(known.recipe, {})
