"""Shared checks of user input: numbers on the command line, output paths, configuration values.

Each class of bad input is checked here once, so every command and configuration answers it the
same way: one line naming the option, field or file (a :class:`~econoserve.errors.UserError`, or
an argparse error from the CLI's parser), exit status 2, no traceback.

* Numbers on the command line: :func:`int_at_least`, :func:`float_above`, :func:`float_at_least`
  (argparse ``type=`` callables; finite values only, ranges stated in the message);
  :func:`int_list` for comma-separated lists of non-negative integers (profiling grids).
* Output paths: :func:`output_file` and :func:`output_dir` refuse, before any work, a path that is
  a directory where a file goes (or the reverse), that lies under a file, or whose nearest
  existing parent directory cannot be written (read-only file systems included).
* Configuration values: :func:`check_field_values` checks a mapping of overrides against a
  dataclass's annotated field types (``int`` takes no floats or booleans, ``bool`` only
  ``true``/``false``, ``float`` only finite numbers, ``str`` only text, ``X | None`` also ``null``),
  naming the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from econoserve.errors import UserError


class OutputPathError(UserError):
    """An output path that cannot be written."""


class ConfigValueError(UserError):
    """A configuration value of the wrong type or range."""


# --------------------------------------------------------------------- numbers on the command line
def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for integers >= ``minimum`` (``1.5``, ``1e3`` and ``abc`` are refused)."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _finite_float(text: str, rule: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number {rule}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number {rule}, got {text!r}")
    return value


def float_above(minimum: float) -> Callable[[str], float]:
    """An argparse ``type`` for finite numbers > ``minimum``."""

    def parse(text: str) -> float:
        value = _finite_float(text, f"> {minimum:g}")
        if value <= minimum:
            raise argparse.ArgumentTypeError(f"expected a number > {minimum:g}, got {text!r}")
        return value

    parse.__name__ = f"number > {minimum:g}"
    return parse


def float_at_least(minimum: float) -> Callable[[str], float]:
    """An argparse ``type`` for finite numbers >= ``minimum``."""

    def parse(text: str) -> float:
        value = _finite_float(text, f">= {minimum:g}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum:g}, got {text!r}")
        return value

    parse.__name__ = f"number >= {minimum:g}"
    return parse


def int_list(text: str | None, name: str) -> tuple[int, ...] | None:
    """The non-negative integers of the comma-separated ``text`` given as option ``name``
    (``"0,16, 64"`` -> ``(0, 16, 64)``; empty items are skipped); None if ``text`` is None.
    Raises :class:`~econoserve.errors.UserError` naming ``name`` for anything else."""
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{name} {text!r}: expected comma-separated integers") from None
    if not values or any(v < 0 for v in values):
        raise UserError(f"{name} {text!r}: expected non-negative integers")
    return values


#: The usual ranges.
positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
seed = non_negative_int  # numpy's generators take no negative seeds
positive_float = float_above(0.0)
non_negative_float = float_at_least(0.0)


# --------------------------------------------------------------------- output paths
def check_output_path(path: str | Path, kind: str, name: str = "output") -> Path:
    """Refuse an output ``path`` (``kind`` ``file`` or ``dir``) that cannot be written; returns it.

    Raises :class:`OutputPathError` naming ``name`` and the path: a directory where a file goes,
    a file where a directory goes, a path under a file, or a nearest existing parent directory in
    which no file can be created (tested by creating and removing one, so read-only file systems
    and permissions count as they will when writing).
    """
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise OutputPathError(f"{name} {path}: is a directory; give a file path")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise OutputPathError(f"{name} {path}: is a file; give a directory path")
    parent = path if kind == "dir" and path.is_dir() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{name} {path}: {parent} is a file, so nothing can be created under it")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".econoserve-write-test-"):
            pass
    except OSError as error:
        raise OutputPathError(f"{name} {path}: cannot write in {parent} ({error.strerror or error})") from None
    return path


def output_file(text: str) -> Path:
    """An argparse ``type`` for a file to write (see :func:`check_output_path`)."""
    return _argparse_path(text, "file")


def output_dir(text: str) -> Path:
    """An argparse ``type`` for a directory to write into (see :func:`check_output_path`)."""
    return _argparse_path(text, "dir")


def _argparse_path(text: str, kind: str) -> Path:
    try:
        return check_output_path(text, kind, name="path")
    except OutputPathError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("path ")) from None


# --------------------------------------------------------------------- configuration values
def check_field_values(owner: str, config_class: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``values`` (field -> value) against the annotated types of dataclass ``config_class``.

    Returns the values, with whole floats for ``int`` fields turned into ints (``1024.0`` ->
    ``1024``; JSON has one number type). Raises :class:`ConfigValueError` naming ``owner`` and the
    field for a value of the wrong type. Unknown fields are the caller's to refuse; fields whose
    annotation is none of ``int``, ``float``, ``bool``, ``str`` and their ``| None`` are passed on.
    """
    hints = typing.get_type_hints(config_class)
    fields = {f.name for f in dataclasses.fields(config_class)}
    checked = dict(values)
    for name, value in values.items():
        if name in fields:
            checked[name] = _check_value(f"{owner}: {name}", value, hints.get(name, Any))
    return checked


def _check_value(label: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        simple = [t for t in options if t is not type(None)]
        if len(simple) == 1:
            return _check_value(label, value, simple[0])
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigValueError(f"{label} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()
        ):
            raise ConfigValueError(f"{label} must be an integer, got {value!r}")
        return int(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigValueError(f"{label} must be a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigValueError(f"{label} must be text, got {value!r}")
        return value
    return value

