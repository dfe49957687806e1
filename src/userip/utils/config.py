"""Validated dataclass configs built from plain dicts (YAML/JSON).

Every component has one ``@dataclass`` config whose keys equal its constructor arguments and whose
``__post_init__`` validates values. ``from_dict`` rejects unknown keys *before* any work starts and names the
key, where it was found, and the accepted keys; it also checks every value against its field's type hint
(the one place types are checked): a bool must be ``true``/``false`` (not ``"yes"`` or ``1``), an int a
whole number (not ``1.5`` or ``true``), a float a finite number (not ``nan``/``.inf``), a str a string, and
lists, tuples, dicts, optionals, enums and nested configs element by element. Ranges stay in each config's
``__post_init__``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import enum
import math
import numbers
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class _YAML12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's float rule added: YAML 1.1 needs a dot, so ``lr: 1e-3`` would load
    as the string "1e-3" (then refused as "expected a number"); every other tag resolves as before."""


_YAML12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and what was expected."""


class _NotANumberError(ConfigError):
    """``check_fields`` found no number at all (a string, None, a list) where a number belongs."""


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "config", base: T | None = None) -> T:
    """Build dataclass ``cls`` from ``data``, checking unknown keys, enum values and nested configs.

    ``data`` updates ``base`` (default: the class defaults): a key left out keeps ``base``'s value, and a
    nested section given as a mapping updates the nested config it sits on -- ``base``'s, else the field's
    own default (a stage's tuned ``default_factory``), never the nested class's bare defaults -- so
    ``train: {lr: 0.05}`` changes the learning rate and nothing else, at any depth."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown} for {cls.__name__}; accepted keys: {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    if base is not None:  # every key left out keeps base's value (copied: the new config owns its lists)
        kwargs = {name: copy.deepcopy(getattr(base, name)) for name in fields}
    type_errors: list[ConfigError] = []
    for name, value in data.items():
        try:
            nested_base = _nested_default(fields[name], base, value)
            if nested_base is not None:
                kwargs[name] = from_dict(type(nested_base), value, f"{where}.{name}", base=nested_base)
            else:
                kwargs[name] = _coerce(hints[name], value, f"{where}.{name}")
        except ConfigError as e:
            type_errors.append(e)
            kwargs[name] = value
    try:
        config = cls(**kwargs)
    except _NotANumberError:
        if type_errors:  # a string where a number belongs: the type check names it best (with a hint)
            raise type_errors[0] from None
        raise
    except ConfigError:
        raise  # the config's own validation names a wrong value best ("must be a non-empty word")
    except Exception as e:  # noqa: BLE001 - a wrongly typed value may break __post_init__ in any way
        if type_errors:
            raise type_errors[0] from None
        if isinstance(e, TypeError | ValueError):
            raise ConfigError(f"{where}: {e}") from e
        raise
    if type_errors:  # the config's validation let a wrongly typed value through: the type check refuses it
        raise type_errors[0]
    return config


def _nested_default(field: dataclasses.Field, base: Any, value: Any) -> Any:
    """The config a nested section's mapping ``value`` updates: ``base``'s value of ``field`` when ``base``
    is given, else the field's default; None when either is not a dataclass config (or ``value`` is not a
    mapping: then the type check names what is wrong)."""
    if not isinstance(value, dict):
        return None
    if base is not None:
        current = getattr(base, field.name)
    elif field.default_factory is not dataclasses.MISSING:
        current = field.default_factory()
    else:
        current = field.default
    if dataclasses.is_dataclass(current) and not isinstance(current, type):
        return current
    return None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-JSON dict of a (nested) dataclass config; enums become their values."""

    def convert(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, list | tuple):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return convert(cfg)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML12Loader)  # noqa: S506 - safe loader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({e})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def check_fields(
    config: Any,
    *,
    positive_ints: Sequence[str] = (),
    counts: Sequence[str] = (),
    optional_positive_ints: Sequence[str] = (),
    optional_counts: Sequence[str] = (),
    int_ranges: Mapping[str, tuple[int, int | None]] | None = None,
    positive_numbers: Sequence[str] = (),
    nonnegative_numbers: Sequence[str] = (),
    fractions: Sequence[str] = (),
    flags: Sequence[str] = (),
    words: Sequence[str] = (),
    choices: Mapping[str, Sequence[str]] | None = None,
    devices: Sequence[str] = (),
    where: str | None = None,
) -> None:
    """The common checks of a config dataclass's ``__post_init__``, declared by field name; each failure is a
    ``ConfigError`` naming ``<where>.<field>`` (``where``: the config's YAML section such as ``train``, else
    its class name), what was expected and what was given.

    ``positive_ints`` >= 1; ``counts`` >= 0; ``optional_positive_ints`` >= 1 or None; ``optional_counts`` >= 0
    or None; ``int_ranges`` field -> (min, max) integers in [min, max] (max None: no upper bound);
    ``positive_numbers`` > 0 and ``nonnegative_numbers`` >= 0 (finite ints or floats); ``fractions`` in
    [0, 1); ``flags`` booleans; ``words`` non-empty strings; ``choices`` field -> accepted values;
    ``devices`` torch devices this machine has (``check_device``)."""
    where = where or type(config).__name__

    def fail(name: str, expected: str, numeric: bool = False) -> None:
        value = getattr(config, name)
        error = _NotANumberError if numeric and not isinstance(value, numbers.Real) else ConfigError
        raise error(f"{where}.{name} must be {expected}, got {value!r}")

    def is_int(value: Any) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    def is_number(value: Any) -> bool:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

    for name in positive_ints:
        if not (is_int(getattr(config, name)) and getattr(config, name) >= 1):
            fail(name, "a positive integer", numeric=True)
    for name in counts:
        if not (is_int(getattr(config, name)) and getattr(config, name) >= 0):
            fail(name, "an integer >= 0", numeric=True)
    for name in optional_positive_ints:
        value = getattr(config, name)
        if value is not None and not (is_int(value) and value >= 1):
            fail(name, "a positive integer or None", numeric=True)
    for name in optional_counts:
        value = getattr(config, name)
        if value is not None and not (is_int(value) and value >= 0):
            fail(name, "an integer >= 0 or None", numeric=True)
    for name, (low, high) in (int_ranges or {}).items():
        value = getattr(config, name)
        if not (is_int(value) and value >= low and (high is None or value <= high)):
            fail(name, f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]", True)
    for name in positive_numbers:
        if not (is_number(getattr(config, name)) and getattr(config, name) > 0):
            fail(name, "a finite number > 0", numeric=True)
    for name in nonnegative_numbers:
        if not (is_number(getattr(config, name)) and getattr(config, name) >= 0):
            fail(name, "a finite number >= 0", numeric=True)
    for name in fractions:
        if not (is_number(getattr(config, name)) and 0 <= getattr(config, name) < 1):
            fail(name, "in [0, 1)", numeric=True)
    for name in flags:
        if not isinstance(getattr(config, name), bool):
            fail(name, "true or false")
    for name in words:
        value = getattr(config, name)
        if not (isinstance(value, str) and value.strip()):
            fail(name, "a non-empty string")
    for name, accepted in (choices or {}).items():
        if getattr(config, name) not in accepted:
            fail(name, f"one of {tuple(accepted)}")
    for name in devices:
        check_device(getattr(config, name), f"{where}.{name}")


DEVICE_TYPES = ("cpu", "cuda")


def check_device(value: Any, where: str) -> None:
    """The one device rule of every config with a device field: ``value`` must parse as a torch device of a
    type in ``DEVICE_TYPES`` (``cpu``, ``cuda``, ``cuda:N``), and a CUDA device must exist on this machine;
    else a ``ConfigError`` naming ``where`` -- before any work, not as a traceback when the model moves."""
    import torch  # here, not at the top: reading a config does not need torch otherwise

    expected = "'cpu' or 'cuda[:N]'"
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where} must be {expected}, got {value!r}")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{where} must be {expected}, got {value!r}") from None
    if device.type not in DEVICE_TYPES:
        raise ConfigError(f"{where} must be {expected}, got {value!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{where} is {value!r} but CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"{where} is {value!r} but this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
            )


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], where: str = "--set") -> dict[str, Any]:
    """``data`` with dotted ``key.path=value`` overrides applied in order (``train.lr=0.02``,
    ``pepler.lm_device=cuda``, ``seeds=[0,1]``); each value is read as YAML, so numbers, booleans and lists
    keep their types. Intermediate mappings are created where missing; the config's own validation
    (``from_dict``) then checks every key and value as if it had been written in the file."""
    out = copy.deepcopy(data)
    for item in overrides:
        path, sep, raw = item.partition("=")
        keys = path.strip().split(".")
        if not sep or not all(k.strip() for k in keys):
            raise ConfigError(f"{where} {item!r}: expected KEY.PATH=VALUE, e.g. train.lr=0.02")
        try:
            value = yaml.load(raw, Loader=_YAML12Loader)  # noqa: S506 - safe loader
        except yaml.YAMLError as e:
            raise ConfigError(f"{where} {item!r}: the value is not valid YAML ({e})") from None
        _set_path(out, keys, value, f"{where} {item!r}")
    return out


def set_values(data: dict[str, Any], values: Mapping[str, Any], where: str = "flags") -> dict[str, Any]:
    """``data`` with each dotted key of ``values`` set (``{"train.lr": 0.02}``); ``None`` values (a command's
    flags left unset) keep the file's or default value. How a CLI merges its own flags into its config,
    before ``apply_overrides`` applies its ``--set`` items."""
    out = copy.deepcopy(data)
    for path, value in values.items():
        if value is not None:
            _set_path(out, path.split("."), value, f"{where} {path}")
    return out


def read_config(
    path: str | Path | None, flags: Mapping[str, Any] | None = None, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """A command's config mapping: the YAML file ``path`` (or empty), its own flags (dotted key -> value,
    ``None`` = unset, see ``set_values``), then its ``--set`` items (``apply_overrides``); later ones win."""
    return merge_cli_values(load_yaml(path) if path is not None else {}, flags or {}, overrides)


def merge_cli_values(
    data: dict[str, Any], flags: Mapping[str, Any], overrides: Sequence[str]
) -> dict[str, Any]:
    """``data`` (a config mapping) with a command's own flags set (``set_values``), then its ``--set`` items
    applied (``apply_overrides``)."""
    return apply_overrides(set_values(data, flags), overrides)


def add_set_argument(parser: Any, example: str) -> None:
    """The ``--set KEY.PATH=VALUE`` option (repeatable) every command with a config has, read by
    ``apply_overrides``; ``example`` is one override shown in the help."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help=f"override any config key, value read as YAML (repeatable): --set {example}",
    )


def positive_int_flag(text: str) -> int:
    """argparse ``type=`` of a count flag (``--limit``, ``-k``): a whole number >= 1, else argparse's own
    error (exit 2, naming the flag), never a silent ``[:-1]`` slice or an empty result."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _set_path(node: dict[str, Any], keys: Sequence[str], value: Any, where: str) -> None:
    """Set ``node[k0][k1]...[kn] = value``, creating missing mappings; a value where a mapping belongs is a
    ``ConfigError``."""
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {'.'.join(keys[: depth + 1])} is a value, not a section")
        node = child
    node[keys[-1]] = value


def choice(enum_cls: type[enum.Enum], value: Any, where: str) -> enum.Enum:
    """Parse ``value`` into ``enum_cls`` with an error listing the accepted values."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        accepted = [m.value for m in enum_cls]
        raise ConfigError(f"{where}: {value!r} is not one of {accepted}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """``value`` checked against the type hint ``tp`` (and converted where lossless: int -> float, list ->
    tuple, str -> Path); a mismatch is a ``ConfigError`` naming ``where``, the expected type and the value."""
    if tp is Any or isinstance(tp, typing.TypeVar):
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        if len(args) == 1:
            return _coerce(args[0], value, where)
        for arg in args:  # the first alternative the value fits
            try:
                return _coerce(arg, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_show(value)}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return choice(tp, value, where)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list ({_type_name(tp)}), got {_show(value)}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values ({_type_name(tp)}), got {len(value)}")
        item_types = [args[0] if args else Any] * len(value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            item_types = list(args)
        items = [_coerce(t, v, f"{where}[{i}]") for i, (t, v) in enumerate(zip(item_types, value))]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping ({_type_name(tp)}), got {_show(value)}")
        key_t, val_t = typing.get_args(tp) or (Any, Any)
        return {
            _coerce(key_t, k, f"{where} key {k!r}"): _coerce(val_t, v, f"{where}.{k}")
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        if type(value).__name__ == "bool_":  # numpy bool from programmatic configs
            return bool(value)
        raise ConfigError(f"{where}: expected true or false, got {_show(value)}")
    if tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {_show(value)}")
    if tp is float:
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            hint = ""
            with contextlib.suppress(TypeError, ValueError):
                if isinstance(value, str) and math.isfinite(float(value)):
                    hint = " (a quoted number? write it without quotes)"
            raise ConfigError(f"{where}: expected a number, got {_show(value)}{hint}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_show(value)}")
        return value
    if tp is Path:
        if not isinstance(value, str | Path):
            raise ConfigError(f"{where}: expected a path (string), got {_show(value)}")
        return Path(value)
    return value


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"
