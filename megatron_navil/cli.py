"""Command-line plumbing shared by the entry points and tools: a user mistake is one line on
stderr and exit code 2 (argparse's default prints the whole usage block first, which buries the
message in a torchrun log of several ranks), and typed numeric arguments with their own messages.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are ``PROG: error: MESSAGE`` and exit 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= lo``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number ``> 0``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def float_at_least(lo: float) -> Callable[[str], float]:
    """An argparse ``type``: a finite number ``>= lo``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value >= lo or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number >= {lo:g}, got {text}")
        return value

    return parse


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """An argument group per group of the options dataclass ``cls`` (``TrainConfig``'s shape:
    ``training.options``), a flag per field: ``--field-name``, typed from the annotation
    (``bool`` a switch, ``list[T]`` one or more values), bounded by its ``min`` /
    ``positive`` metadata (so a bad value is ``argument --flag: must be >= 1, got 0``)."""
    from megatron_navil.training.options import option_fields, option_type

    groups: dict[str, argparse._ArgumentGroup] = {}
    for group, title, f in option_fields(cls):
        g = groups.setdefault(group, parser.add_argument_group(title))
        meta = f.metadata
        owner = type(getattr(cls(), group))
        kind, many, _ = option_type(owner, f)
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, object] = {"help": meta["help"], "dest": f"{group}.{f.name}"}
        if kind is bool:
            g.add_argument(flag, action="store_true", **kwargs)
            continue
        if "min" in meta:
            bound = int_at_least if kind is int else float_at_least
            kwargs["type"] = bound(meta["min"])
        elif meta.get("positive"):
            kwargs["type"] = positive_float
        else:
            kwargs["type"] = kind
        for key in ("choices", "metavar"):
            if key in meta:
                kwargs[key] = meta[key]
        if "choices" not in meta:
            kwargs.setdefault("metavar", f.name.upper())
        if many:
            kwargs["nargs"] = "+"
        if meta.get("required"):
            kwargs["required"] = True
        else:
            kwargs["default"] = getattr(getattr(cls(), group), f.name)
        g.add_argument(flag, **kwargs)


def options_from_args(cls: type, args: argparse.Namespace) -> object:
    """The ``cls`` instance of the namespace ``add_options(parser, cls)`` parsed."""
    from megatron_navil.training.options import option_fields

    values: dict[str, dict[str, object]] = {}
    for group, _, f in option_fields(cls):
        values.setdefault(group, {})[f.name] = getattr(args, f"{group}.{f.name}")
    defaults = cls()
    return cls(**{g: type(getattr(defaults, g))(**kw) for g, kw in values.items()})
