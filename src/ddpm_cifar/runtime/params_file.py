"""params.yaml read strictly into the typed sections of :mod:`.config`.

Loading is strict: a missing key, an unknown key or a value of the wrong type is a
:class:`ConfigError` whose one-line message names the key, and the whole file is checked whatever
a stage reads (:func:`check_file`). Stages declare which sections (or single keys) they read;
:class:`Params` refuses to hand out anything undeclared, so the ``params:`` lists in dvc.yaml
cannot silently drift from the code.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .bounds import SEED_MAX
from .config import SECTIONS, FrontierCurve, SamplerConfig, plain, to_dict
from .errors import ConfigError

T = TypeVar("T")
# Blocks nested inside a section, built with ``where`` = their key so that messages name it.
_BLOCKS = (SamplerConfig, FrontierCurve)


class _Loader(yaml.SafeLoader):
    """PyYAML resolves ``1e-4`` as a string (YAML 1.1 wants a dot); read it as a float like DVC does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)$|^[-+]?(?:\d+\.\d*|\.\d+)$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str) -> Any:
    """YAML text as params files are read (``1e-4`` a float, as DVC reads it); ``source`` names it
    in the one-line error."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (SafeLoader subclass)
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: an integer of over 4,300 digits
        raise ConfigError(f"{source} is not valid YAML: {exc}".splitlines()[0]) from exc


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} not found")
    data = parse_yaml(path.read_text(), str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections")
    return data


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; convert lists to tuples and ints to floats."""
    if tp in _BLOCKS:  # a nested block, named by its key in every message
        return parse_section(key, value, tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer beyond float's range
                raise ConfigError(f"{key} must be a finite number, got an integer of "
                                  f"{len(str(abs(value)))} digits") from None
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    else:  # pragma: no cover - only the annotations above are used
        raise TypeError(f"unsupported config annotation {tp!r} for {key}")
    raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is tuple:
        return "a list"
    if tp in _BLOCKS:
        return "a mapping"
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string"}[tp]


def parse_section(name: str, raw: Any, cls: type[T]) -> T:
    """Build the dataclass ``cls`` from the mapping ``raw``, naming any bad key as ``name.key``."""
    fields = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    if not isinstance(raw, Mapping):
        if "." in name:  # a block inside a section
            raise ConfigError(f"{name} must be a mapping of {', '.join(fields)}; got {raw!r}")
        raise ConfigError(f"params section {name!r} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise ConfigError(f"unknown key {name}.{unknown[0]} (known: {', '.join(fields)})")
    optional = getattr(cls, "OPTIONAL", ())  # keys with a default that may be left out
    missing = [k for k in fields if k not in raw and k not in optional]
    if missing:
        raise ConfigError(f"missing key {name}.{missing[0]}")
    values = {k: _coerce(f"{name}.{k}", raw[k], hints[k]) for k in fields if k in raw}
    if cls in _BLOCKS:
        return cls(**values, where=name)
    return cls(**values)


class Params:
    """The params a stage declared, and nothing else.

    ``declared`` holds section names ("train") or single keys ("fid.inception_weights"), exactly
    as the stage's ``params:`` list in dvc.yaml.
    """

    def __init__(self, raw: Mapping[str, Any], declared: Sequence[str], source: str = "params"):
        self._sections = check_file(raw)  # every section the file has, parsed and checked once
        self.declared = tuple(declared)
        self._source = source

    def section(self, name: str) -> Any:
        if name not in self.declared:
            raise RuntimeError(f"this stage reads params section {name!r} without declaring it")
        if name not in self._sections:
            raise ConfigError(f"missing section {name!r} in {self._source}")
        return self._sections[name]

    def key(self, dotted: str) -> Any:
        """One key of a section, type-checked against that section's dataclass."""
        if dotted not in self.declared:
            raise RuntimeError(f"this stage reads param {dotted!r} without declaring it")
        section, key = dotted.split(".", 1)
        cls = SECTIONS[section]
        if key not in {f.name for f in dataclasses.fields(cls)}:
            raise RuntimeError(f"{dotted} is not a field of {cls.__name__}")
        if section not in self._sections:
            raise ConfigError(f"missing key {dotted}")
        return getattr(self._sections[section], key)

    def as_dict(self) -> dict[str, Any]:
        """Every declared section and key, checked, as plain data nested like params.yaml."""
        out: dict[str, Any] = {}
        for name in self.declared:
            if "." in name:
                section, key = name.split(".", 1)
                out.setdefault(section, {})[key] = plain(self.key(name))
            else:
                out[name] = to_dict(self.section(name))
        return out


def check_file(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Every section of a params file, read or not by the stage at hand, parsed, and the rules that
    relate keys of two sections checked: a value that would fail a later stage fails before the first
    one works. A missing section is an error only for the stage that reads it (:meth:`Params.section`)."""
    parsed = {name: parse_section(name, raw[name], cls) for name, cls in SECTIONS.items() if name in raw}
    diffusion = parsed.get("diffusion")
    # Both samplers run the diffusion these params train: more steps than it has timesteps is
    # refused by the sample stage after the whole training run.
    for section, block in (("sample", "sampler"), ("train", "fid_sampler")):
        if diffusion is not None and section in parsed:
            getattr(parsed[section], block).check_steps(diffusion.timesteps, f"{section}.{block}")
    # The frontier's step counts and seeds only while it is on: its default curves go to 1,000 steps,
    # more than a toy diffusion has, and it runs nothing while off.
    frontier_on = "frontier" in parsed and parsed["frontier"].enabled
    if diffusion is not None and frontier_on:
        for i, curve in enumerate(parsed["frontier"].curves):
            for sampler in curve.samplers():
                sampler.check_steps(diffusion.timesteps, f"frontier.curves[{i}]")
    if frontier_on and "sample" in parsed:  # the frontier's seeds are the sample stage's first n
        sample = parsed["sample"]
        if sample.seed + parsed["frontier"].n - 1 > SEED_MAX:
            n = parsed["frontier"].n
            raise ConfigError(f"sample.seed {sample.seed} is too large for frontier.n {n}: "
                              "the frontier's image i uses sample.seed + i, below 2^63")
    return parsed


def load_params(path: str | Path, declared: Sequence[str]) -> Params:
    raw = read_yaml(path)
    unknown = [s for s in raw if s not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown params section {unknown[0]!r} (known: {', '.join(SECTIONS)})")
    return Params(raw, declared, source=str(path))
