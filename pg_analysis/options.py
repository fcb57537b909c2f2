"""Options declared once: a dataclass field carries its default and its help text, and the command-line flags are
generated from the fields.

>>> @dataclass
... class Config:
...     steps: int = option(100, "optimizer steps (default: %(default)s)")
>>> add_dataclass_arguments(parser, Config)  # doctest: +SKIP   → --steps, typed int, with that help
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable


def _or_none(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse type for an optional number: ``none`` gives None (a preset's value switched off)."""
    def parse(value: str) -> Any:
        return None if value.lower() == "none" else kind(value)
    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


_TYPES: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "int | None": _or_none(int),
                                           "float | None": _or_none(float)}


def option(default: Any, help: str) -> Any:
    """A dataclass field with ``default`` and its ``--flag`` help (``%(default)s`` shows the default)."""
    return dataclasses.field(default=default, metadata={"help": help})


def parse_bool(value: str) -> bool:
    """argparse type for ``--flag true/false`` (also 1/0, yes/no, on/off)."""
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                            rename: dict[str, str] | None = None,
                            types: dict[str, Callable[[str], Any]] | None = None, only_given: bool = False) -> None:
    """One ``--field-name`` flag per field of ``cls`` with help from its metadata (fields in ``skip`` left out).

    Booleans take an optional value (``--lora`` or ``--lora false``); ``int``/``float`` fields are typed;
    ``rename`` maps a field to another flag, ``types`` overrides a field's argparse type. ``only_given``: the
    parsed namespace holds only the flags given (so they can override a preset); the help still shows the field's
    default.
    """
    rename, types = rename or {}, types or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} has no help text: declare it with option(default, help)")
        help_text = f.metadata["help"]
        if only_given:
            help_text = help_text.replace("%(default)s", str(f.default).replace("%", "%%"))
        kw: dict[str, Any] = {"default": argparse.SUPPRESS if only_given else f.default, "help": help_text,
                              "dest": f.name}
        if f.name in types:
            kw["type"] = types[f.name]
        elif f.type == "bool":
            kw.update(type=parse_bool, nargs="?", const=True)
        elif f.type in _TYPES:
            kw["type"] = _TYPES[f.type]
        parser.add_argument(rename.get(f.name, "--" + f.name.replace("_", "-")), **kw)
