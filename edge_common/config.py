"""Typed configuration: one frozen dataclass per service; flags, environment and a file map onto it.

Precedence, lowest first: the field's default, the file given by --config, the environment
(PREFIX_FIELD_NAME), the command-line flag (--field-name). Unknown keys in the file are errors, so
a typo never silently falls back to a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_META = "edge_option"


class ConfigError(Exception):
    """Configuration a person must fix; the message names the key and where it came from."""


@dataclass(frozen=True)
class _OptionMeta:
    help: str
    env: bool
    metavar: str | None
    secret: bool


def option(
    default: Any,
    *,
    help: str,
    env: bool = True,
    metavar: str | None = None,
    secret: bool = False,
) -> Any:
    """Declare a config field. Lists and dicts get a fresh copy per instance.

    A ``secret`` option is never a command-line flag (flags show in ``ps`` and
    /proc/PID/cmdline): it comes from the file or the environment only, and never appears in
    the instance's repr.
    """
    meta = {_META: _OptionMeta(help=help, env=env, metavar=metavar, secret=secret)}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta,
                                 repr=not secret)
    return dataclasses.field(default=default, metadata=meta, repr=not secret)


@dataclass(frozen=True)
class OptionDoc:
    name: str
    flag: str
    env: str | None
    type: str
    default: str
    help: str


def _fields(cls: type) -> list[tuple[dataclasses.Field[Any], Any, _OptionMeta]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(_META)
        if meta is None:
            continue
        out.append((f, hints[f.name], meta))
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env_name(prefix: str, name: str) -> str:
    return f"{prefix}{name.upper()}"


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _type_name(tp: Any) -> str:
    inner, optional = _unwrap_optional(tp)
    origin = typing.get_origin(inner)
    if origin is list:
        name = "list"
    elif origin is dict:
        name = "map"
    elif isinstance(inner, type) and issubclass(inner, enum.Enum):
        name = "|".join(str(m.value) for m in inner)
    else:
        name = getattr(inner, "__name__", str(inner))
    return name + (" (optional)" if optional else "")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def convert(value: Any, tp: Any, where: str) -> Any:
    """Convert a value from a file (already typed YAML) or a string (env, flag) to tp."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value == ""):
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required")
    origin = typing.get_origin(inner)
    try:
        if inner is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError(f"expected true or false, got {value!r}")
        if inner is int:
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            return int(value)
        if inner is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if inner is str:
            if isinstance(value, dict | list):
                raise ValueError("expected a string")
            return str(value)
        if inner is Path:
            return Path(str(value))
        if isinstance(inner, type) and issubclass(inner, enum.Enum):
            try:
                return inner(value)
            except ValueError:
                allowed = ", ".join(str(m.value) for m in inner)
                raise ValueError(f"expected one of {allowed}, got {value!r}") from None
        if origin is list:
            (item_tp,) = typing.get_args(inner) or (str,)
            items = value if isinstance(value, list) else _split_list(str(value))
            return [convert(item, item_tp, where) for item in items]
        if origin is dict:
            _, val_tp = typing.get_args(inner) or (str, str)
            mapping = value if isinstance(value, dict) else _split_map(str(value))
            return {str(k): convert(v, val_tp, f"{where}.{k}") for k, v in mapping.items()}
        if inner is Any:
            return value
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    raise ConfigError(f"{where}: unsupported option type {inner!r}")


def _split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _split_map(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in _split_list(text):
        key, sep, val = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected key=value pairs separated by commas, got {part!r}")
        out[key.strip()] = val.strip()
    return out


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field, plus --config. Flags left out stay unset (file/env/default apply)."""
    if not any("--config" in a.option_strings for a in parser._actions):
        parser.add_argument(
            "--config", metavar="FILE", default=argparse.SUPPRESS,
            help="YAML file with any of the options below (keys as snake_case or kebab-case)",
        )
    for f, tp, meta in _fields(cls):
        if meta.secret:
            continue  # file or environment only
        inner, _ = _unwrap_optional(tp)
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        default = _default_of(f)
        help_text = meta.help
        if not meta.secret and default not in (None, "", [], {}):
            help_text += f" (default: {_show(default)})"
        if inner is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = meta.metavar or _type_name(tp).split(" ")[0].upper()
        parser.add_argument(_flag(f.name), help=help_text, **kwargs)


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _show(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    import yaml  # only services started with --config pay for it (about 1 MiB resident)

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of option names to values")
    return data


def resolve(
    cls: type[T],
    namespace: argparse.Namespace | Mapping[str, Any] | None = None,
    *,
    env_prefix: str,
    environ: Mapping[str, str] | None = None,
    file_data: Mapping[str, Any] | None = None,
) -> T:
    """Build cls from defaults, then file, environment and flags (later wins)."""
    flags = dict(vars(namespace)) if isinstance(namespace, argparse.Namespace) else dict(
        namespace or {}
    )
    environ = os.environ if environ is None else environ
    if file_data is None and flags.get("config"):
        file_data = read_file(flags["config"])
    file_values = _normalise_file_keys(cls, file_data or {})
    values: dict[str, Any] = {}
    for f, tp, meta in _fields(cls):
        if f.name in file_values:
            values[f.name] = convert(file_values[f.name], tp, f"config file key {f.name!r}")
        env_key = _env_name(env_prefix, f.name)
        if meta.env and env_key in environ:
            values[f.name] = convert(environ[env_key], tp, f"environment {env_key}")
        if f.name in flags:
            values[f.name] = convert(flags[f.name], tp, f"flag {_flag(f.name)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def _normalise_file_keys(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    known = {f.name for f, _, _ in _fields(cls)}
    out: dict[str, Any] = {}
    unknown = []
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in known:
            out[name] = value
        else:
            unknown.append(str(key))
    if unknown:
        raise ConfigError(
            f"config file: unknown option(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(known))}"
        )
    return out


def load(
    cls: type[T],
    argv: Sequence[str] | None,
    *,
    env_prefix: str,
    prog: str,
    description: str,
    version: str | None = None,
) -> T:
    """Parse argv for a single-command service; exits with status 2 and a message on bad input."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    if version is not None:
        parser.add_argument("--version", action="version", version=f"{prog} {version}")
    add_arguments(parser, cls)
    ns = parser.parse_args(argv)
    try:
        return resolve(cls, ns, env_prefix=env_prefix)
    except ConfigError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def describe(cls: type, env_prefix: str) -> list[OptionDoc]:
    """Rows for the configuration reference in the docs, generated from the code."""
    rows = []
    for f, tp, meta in _fields(cls):
        default = _default_of(f)
        rows.append(
            OptionDoc(
                name=f.name,
                flag="" if meta.secret else _flag(f.name),
                env=_env_name(env_prefix, f.name) if meta.env else None,
                type=_type_name(tp),
                default="" if meta.secret or default is None else _show(default),
                help=meta.help,
            )
        )
    return rows


def markdown_table(cls: type, env_prefix: str) -> str:
    lines = [
        "| file key | flag | environment | type | default | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for row in describe(cls, env_prefix):
        default = f"`{_cell(row.default)}`" if row.default != "" else ""
        env = f"`{row.env}`" if row.env else ""
        flag = f"`{row.flag}`" if row.flag else "(none: secret)"
        lines.append(
            f"| `{row.name}` | {flag} | {env} | {_cell(row.type)} | {default} "
            f"| {_cell(row.help)} |"
        )
    return "\n".join(lines)


def _cell(text: str) -> str:
    """A Markdown table cell: a literal | would end the cell."""
    return text.replace("|", "\\|").replace("\n", " ")
