"""Typed, frozen configuration.

Every component has one frozen dataclass whose fields carry their documentation
(``option(default, "help")``). ``parse_config`` builds it once, at the entry point, from
(lowest to highest precedence) the field defaults, a YAML/JSON file given with ``--config``,
environment variables and command-line flags:

    field ``port``            flag ``--port``        env ``<PREFIX>PORT``
    nested ``ppo.beta``       flag ``--ppo.beta``    env ``<PREFIX>PPO__BETA``

Lists are comma-separated in flags and env, plain lists in files. A dataclass may validate
itself in ``__post_init__`` by raising ``ValueError``; the message reaches the user as a
command-line error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its documentation (shown by ``--help``)."""
    if isinstance(default, list | dict | set):
        raise TypeError("use a tuple or default_factory for mutable defaults")
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


# Environment prefix of sections every component shares (``section(..., shared=True)``):
# ``RLHF_STREAMS__TOPIC_PREFIX`` sets ``streams.topic_prefix`` for every process at once.
SHARED_ENV_PREFIX = "RLHF_"


def section(cls: type, help: str, *, shared: bool = False) -> Any:
    """A nested config dataclass field. A ``shared`` section is the same in every component:
    besides ``<PREFIX><SECTION>__<NAME>`` it reads ``RLHF_<SECTION>__<NAME>`` from the
    environment (the component's own variable wins), so a deployment sets it once."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "shared": shared})


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, type, dataclasses.Field]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(_leaves(typing.cast(type, tp), f"{prefix}{f.name}."))
        else:
            out.append((prefix + f.name, tp, f))
    return out


def _convert(tp: Any, raw: Any, where: str) -> Any:
    """Converts a raw value (a string from env/flags, or a YAML value) to the field's type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in {"", "none", "null"}):
            return None
        return _convert(inner[0], raw, where)
    if origin is tuple:
        items = [s.strip() for s in raw.split(",") if s.strip()] if isinstance(raw, str) else raw
        if not isinstance(items, Sequence):
            raise ValueError(f"{where}: expected a list, got {raw!r}")
        return tuple(_convert(args[0], item, where) for item in items)
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(f"{where}: expected true or false, got {raw!r}")
    if tp in (int, float):
        try:
            return tp(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a number, got {raw!r}") from None
    if tp is Path:
        return Path(str(raw))
    if tp is str:
        return str(raw)
    raise TypeError(f"{where}: unsupported config type {tp!r}")


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = prefix + str(key).replace("-", "_")
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _build(cls: type[T], values: Mapping[str, Any], prefix: str = "", base: Any = None) -> T:
    """Builds ``cls`` from flat values; ``base`` (a section's own default) supplies the rest."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            if base is not None:
                default = getattr(base, f.name)
            elif f.default_factory not in (dataclasses.MISSING, tp):
                # A factory with its own defaults (not the plain class, whose defaults
                # _build applies itself, and which may only validate with values given).
                default = f.default_factory()
            else:
                default = None
            kwargs[f.name] = _build(typing.cast(type, tp), values, f"{prefix}{f.name}.", default)
        elif prefix + f.name in values:
            kwargs[f.name] = values[prefix + f.name]
    if base is not None:
        return dataclasses.replace(base, **kwargs)
    return cls(**kwargs)


def load_config(
    cls: type[T],
    *,
    file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    env_prefix: str = "",
    flags: Mapping[str, Any] | None = None,
) -> T:
    """Builds ``cls`` from a file, environment and flag values (raises ValueError on bad input)."""
    leaves = {name: tp for name, tp, _ in _leaves(cls)}
    values: dict[str, Any] = {}
    if file is not None:
        text = Path(file).read_text()
        data = json.loads(text) if str(file).endswith(".json") else yaml.safe_load(text)
        data = data or {}
        if not isinstance(data, Mapping):
            raise ValueError(f"{file}: expected a mapping at the top level")
        for name, raw in _flatten(data).items():
            if name not in leaves:
                raise ValueError(f"{file}: unknown setting {name!r}")
            values[name] = _convert(leaves[name], raw, f"{file}: {name}")
    if env is not None:
        shared = {f.name for f in dataclasses.fields(cls) if f.metadata.get("shared")}  # type: ignore[arg-type]
        for name, tp in leaves.items():
            keys = [env_prefix + name.upper().replace(".", "__")] if env_prefix else []
            if name.split(".")[0] in shared:
                keys.insert(0, SHARED_ENV_PREFIX + name.upper().replace(".", "__"))
            for key in keys:  # the later, component-specific one wins
                if key in env:
                    values[name] = _convert(tp, env[key], key)
    for name, raw in (flags or {}).items():
        if name not in leaves:
            raise ValueError(f"unknown setting {name!r}")
        values[name] = _convert(leaves[name], raw, f"--{name.replace('_', '-')}")
    return _build(cls, values)


def parse_config(
    cls: type[T],
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    env_prefix: str,
) -> T:
    """Parses ``argv`` (``--config FILE`` and one flag per field) plus the environment."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"{description}\n\nEvery flag can also be set in the --config file or "
        f"as an environment variable {env_prefix}<NAME> (nested: {env_prefix}<SECTION>__<NAME>).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML or JSON file with settings")
    for name, _tp, f in _leaves(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=argparse.SUPPRESS,
            metavar="VALUE",
            # argparse %-formats help texts: a literal "%" ("10%") would crash --help.
            help=f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%"),
        )
    args = vars(parser.parse_args(argv))
    file = args.pop("config", None)
    try:
        return load_config(cls, file=file, env=os.environ, env_prefix=env_prefix, flags=args)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
