"""Checked loaders: every file the pipeline reads back (.npz arrays, JSON reports, TSV logs, YAML) goes
through one of these, so that a damaged, foreign or outdated file stops the stage with one line that
names the file and says how to make it again, never with a traceback; and nothing is unpickled.

Each caller describes its file with a :class:`Source` (what the file is, how to remake it) and, for an
.npz, an :class:`Array` per member (dtype, shape, lengths shared between members). Float arrays and
numbers must be finite. Checkpoints and weights are torch files: models/checkpoint.py checks those.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .fileio import why_unreadable


@dataclass(frozen=True)
class Source:
    """What a file should be and how to make it again, for the one-line refusals."""

    what: str  # with its article: "<path> is not <what> (<why>)", e.g. "a sample set .npz"
    fix: str  # for a file that is there but unusable, e.g. "remove it and rerun `dvc repro`, ..."
    missing: str = ""  # for a file that is not there; empty: say only that it is not found

    def refuse(self, path: str | Path, why: str) -> UserError:
        return UserError(f"{path} is not {self.what} ({why}): {self.fix}")

    def absent(self, path: str | Path) -> UserError:
        return UserError(f"{path} not found" + (f": {self.missing}" if self.missing else ""))


# Array.dtype names either a numpy dtype ("uint8") or a kind of values, by numpy's dtype.kind letters.
_KINDS = {"int": "iu", "float": "f", "number": "iuf", "text": "U"}
_KIND_NAMES = {"int": "integers", "float": "floats", "number": "numbers", "text": "text"}


@dataclass(frozen=True)
class Array:
    """What one member of an .npz must be."""

    dtype: str  # a numpy dtype ("uint8"), or a kind: "int", "float", "number", "text"
    # The shape: () for a single value; an int is a fixed length, a str a length that every member naming
    # it shares (("N", "H", "W", 3) images and ("N",) seeds: one seed per image).
    shape: tuple[int | str, ...] = ()
    optional: bool = False

    def mismatch(self, name: str, arr: np.ndarray, lengths: dict[str, tuple[int, str]]) -> str | None:
        """Why ``arr`` (member ``name``) is not what this says, or None; ``lengths`` collects the named
        lengths seen so far (length, member)."""
        kinds = _KINDS.get(self.dtype)
        if (arr.dtype.kind not in kinds) if kinds else arr.dtype != np.dtype(self.dtype):
            return f"its {name!r} is {arr.dtype}, not {_KIND_NAMES.get(self.dtype, self.dtype)}"
        fixed = all(isinstance(want, str) or got == want for want, got in zip(self.shape, arr.shape))
        if arr.ndim != len(self.shape) or not fixed:
            return f"its {name!r} has shape {arr.shape}, not {_shape_text(self.shape)}"
        for want, got in zip(self.shape, arr.shape):
            if isinstance(want, str):
                length, where = lengths.setdefault(want, (got, name))
                if length != got:
                    return f"its {name!r} has shape {arr.shape}: {want} is {length} in {where!r}"
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            return f"its {name!r} holds NaN or infinite values"
        return None


def _shape_text(shape: tuple[int | str, ...]) -> str:
    if not shape:
        return "a single value"
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def load_npz(path: str | Path, members: Mapping[str, Array], source: Source) -> dict[str, np.ndarray]:
    """The ``members`` of the .npz at ``path``, read in full and checked (an optional one that is absent is
    left out); never unpickles. A damaged or foreign file is a :class:`UserError` of ``source``'s."""
    path = Path(path)
    if not path.is_file():
        raise source.absent(path)
    # Our own file object, closed here with the archive read through it: np.load leaves a file it opened
    # itself open when the zip is damaged.
    with open(path, "rb") as f:
        try:
            data = np.load(f, allow_pickle=False)
        except Exception as exc:  # zip, format and numpy's own errors, and its refusal to unpickle
            raise source.refuse(path, why_unreadable(exc)) from exc
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise source.refuse(path, "it holds a single array, not named arrays")
        arrays: dict[str, np.ndarray] = {}
        with data:
            for name, spec in members.items():
                if name not in data.files:
                    if spec.optional:
                        continue
                    raise source.refuse(path, f"it has no {name!r} array")
                try:
                    arrays[name] = data[name]
                except Exception as exc:  # a damaged member (CRC, zlib), object arrays
                    raise source.refuse(path, why_unreadable(exc)) from exc
    lengths: dict[str, tuple[int, str]] = {}
    for name, arr in arrays.items():
        if why := members[name].mismatch(name, arr, lengths):
            raise source.refuse(path, why)
    return arrays


def json_text(path: str | Path, name: str, arr: np.ndarray, source: Source) -> dict[str, Any]:
    """The JSON object held as text in the .npz member ``name`` (checked as ``Array("text")``)."""
    try:
        value = json.loads(str(arr))
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise source.refuse(path, f"its {name!r} is not the JSON text of an object")
    return value


# What a JSON (or YAML) field must hold: "number" (finite, not a bool), "int" (whole, not a bool), "bool",
# "str", "list", "object", "any".
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "number": (int, float), "int": (int,), "bool": (bool,), "str": (str,), "list": (list,), "object": (dict,),
    "any": (object,)}
_JSON_NAMES = {"number": "a finite number", "int": "a whole number", "bool": "true or false", "str": "text",
               "list": "a list", "object": "an object", "any": "a value"}


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float) and not math.isfinite(value):
        return {math.inf: "Infinity", -math.inf: "-Infinity"}.get(value, "NaN")
    return {bool: "a boolean", str: "text", list: "an array", dict: "an object"}.get(type(value), "a number")


def check_fields(obj: Mapping[str, Any], fields: Mapping[str, str], owner: str = "it") -> str | None:
    """Why ``obj`` lacks one of ``fields`` ({key: "number" | "int" | ...}) or holds it of another type,
    or None; ``owner`` names ``obj`` in the reason ("it", "baseline 2")."""
    for key, kind in fields.items():
        if key not in obj:
            return f"{owner} has no {key!r}"
        value = obj[key]
        is_bool = isinstance(value, bool)
        ok = isinstance(value, _JSON_TYPES[kind]) and not (is_bool and kind in ("number", "int"))
        if not ok or (isinstance(value, float) and not math.isfinite(value)):
            whose = "its" if owner == "it" else f"{owner}'s"
            return f"{whose} {key!r} is {_json_kind(value)}, not {_JSON_NAMES[kind]}"
    return None


def load_json(path: str | Path, source: Source, fields: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The JSON object at ``path``, with ``fields`` ({key: kind}, see :func:`check_fields`) checked."""
    path = Path(path)
    if not path.is_file():
        raise source.absent(path)
    text = _utf8(path, source)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise source.refuse(path, f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(obj, dict):
        kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(obj), "number")
        raise source.refuse(path, f"it holds a JSON {kind}, not an object")
    if fields and (why := check_fields(obj, fields)):
        raise source.refuse(path, why)
    return obj


def load_yaml(path: str | Path, source: Source) -> Any:
    """The YAML document at ``path`` (safe loading: plain values only)."""
    import yaml  # here: only the plots stage reads a YAML file this way

    path = Path(path)
    if not path.is_file():
        raise source.absent(path)
    text = _utf8(path, source)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise source.refuse(path, f"not YAML: {problem}{where}") from None


def _utf8(path: Path, source: Source) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise source.refuse(path, "not UTF-8 text") from None


_STEP = re.compile(r"[0-9]+")
# The training logs: DVCLive's histories under dvclive/plots/metrics/, one TSV per value ("step", then the
# value), read back by the train stage on resume and by the plots stage. Removed, DVC reruns the train stage
# (the folder is its output), which resumes from its checkpoint and starts the logs afresh from there;
# tests/test_damaged_files.py runs the command in a DVC project.
TRAIN_LOG = Source(
    "a training log",
    "remove it and rerun `dvc repro`, whose train stage starts it again (from the step training resumes at)",
    missing="run `dvc repro`, whose train stage writes it")


def live_metrics_dir(live_dir: str | Path) -> Path:
    """The folder of DVCLive's metric histories in ``live_dir``."""
    return Path(live_dir) / "plots" / "metrics"


def live_metric_path(live_dir: str | Path, name: str) -> Path:
    """Where DVCLive (``Live(dir=live_dir).log_metric(name, ...)``) keeps the history of ``name``."""
    return live_metrics_dir(live_dir) / f"{name}.tsv"


def load_live_metric(live_dir: str | Path, name: str, max_step: int | None = None) -> list[tuple[int, float]]:
    """(step, value) rows of DVCLive's history of ``name``, checked, up to ``max_step``."""
    rows = load_tsv(live_metric_path(live_dir, name), TRAIN_LOG, columns=("step", name), max_step=max_step)
    return [(int(step), float(value)) for step, value in rows]


def load_tsv(path: str | Path, source: Source, columns: Sequence[str] | None = None,
             max_step: int | None = None) -> list[list[str]]:
    """The rows of a training log (a header, then a step and finite numbers per line), as text, up to
    ``max_step``. The header must be ``columns`` (when given) and start with ``step``. A last line without
    its newline was torn by a crash mid-write: it is dropped, not refused."""
    path = Path(path)
    if not path.is_file():
        raise source.absent(path)
    lines = _utf8(path, source).split("\n")
    lines.pop()  # "" after the last newline, or the torn line of a crash
    if not lines:
        raise source.refuse(path, "it is empty: no header line")
    header = lines[0].split("\t")
    expected = list(columns) if columns is not None else ["step", *header[1:]]
    if header != expected or len(header) < 2:
        raise source.refuse(path, f"its header is {lines[0][:60]!r}, not {chr(9).join(expected)!r}")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != len(header) or not _STEP.fullmatch(fields[0]) or not all(map(_finite, fields[1:])):
            numbers = f"{len(header) - 1} finite number" + ("s" if len(header) > 2 else "")
            raise source.refuse(path, f"line {number} is {line[:60]!r}, not a step and {numbers}")
        if max_step is None or int(fields[0]) <= max_step:
            rows.append(fields)
    return rows


def _finite(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False
