"""The flag registry: every command-line flag is declared once, on the config field it sets.

A field declared with `flag(...)` carries its default, its help text and, where it differs
from the field name, its Megatron-LM spelling; argparse is generated from the dataclass, and
the parsed namespace turns back into the dataclass. Nothing else repeats a flag (in the
spirit of megatron-core's `argparse_meta` field metadata, written for this project).

    @dataclass
    class ServerConfig:                      # e.g. megatron/early_exit/server/config.py
        FLAG_GROUP: ClassVar[str] = "server"
        host: str = flag("127.0.0.1", help="bind address (0.0.0.0 exposes it)")
        port: int = flag(5000, help="0 picks a free port")
        api_key: str | None = flag(None, help="require `Authorization: Bearer KEY`")

    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_flags(parser, ServerConfig)          # an argument group "server"
    config = from_args(ServerConfig, parser.parse_args())

and pin the option strings in a test with `option_strings(ServerConfig)` (see
tests/unit/test_arguments.py), so flags never grow or change by accident.

What argparse gets follows from the annotation and the default:

* `bool` defaulting to False: `store_true`; defaulting to True: give `name="--no-..."`
  and the flag stores False (`batch_p2p_comm: bool = flag(True, name="--no-batch-p2p-comm")`);
* `list[T]`: one or more values (`nargs="+"`) of type T, or a repeatable flag with
  `append=True`; `list[T] | None` likewise, None when absent;
* `T | None`: type T, None when absent; `str`, `int`, `float`: that type;
* `choices=`, `aliases=` (more option strings), `metavar=`; `tags=` label fields for code
  that selects them (e.g. the exit flags a checkpoint records).

A field of a dataclass type (`model: ModelConfig = field(default_factory=ModelConfig)`) adds
that config's flags as its own argument group (its `FLAG_GROUP`); fields without `flag()` are
not flags (derived values, or set by the program). `from_args` builds the dataclass, nested
ones included, from a namespace; `overrides` patches the argparse setup of single flags
(e.g. a tool that makes a flag required).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

_META = "ee_flag"


@dataclasses.dataclass(frozen=True)
class FlagSpec:
    """What `flag()` records in the field's metadata."""

    help: str
    name: str | None  # option string if not derived from the field name
    aliases: tuple[str, ...]
    choices: tuple | None
    append: bool
    metavar: str | None
    tags: frozenset[str]


def flag(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    name: str | None = None,
    aliases: Sequence[str] = (),
    choices: Sequence | None = None,
    append: bool = False,
    metavar: str | None = None,
    tags: Sequence[str] = (),
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field that is also a command-line flag (see the module docstring).

    A list default is given as `default_factory=list` (or a list literal, copied per
    instance)."""
    if isinstance(default, list):
        default_factory, default = (lambda value=tuple(default): list(value)), dataclasses.MISSING
    spec = FlagSpec(
        help=help,
        name=name,
        aliases=tuple(aliases),
        choices=None if choices is None else tuple(choices),
        append=append,
        metavar=metavar,
        tags=frozenset(tags),
    )
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata={_META: spec}
    )


def option_string(f: dataclasses.Field) -> str:
    spec: FlagSpec = f.metadata[_META]
    return spec.name or "--" + f.name.replace("_", "-")


def flag_fields(cls) -> list[dataclasses.Field]:
    """The fields of `cls` declared with `flag()`, in declaration order (not nested ones)."""
    return [f for f in dataclasses.fields(cls) if _META in f.metadata]


def tagged(cls, tag: str) -> tuple[str, ...]:
    """Names of the flag fields of `cls` carrying `tag`."""
    return tuple(f.name for f in flag_fields(cls) if tag in f.metadata[_META].tags)


def _field_types(cls) -> dict[str, Any]:
    """The evaluated annotation of each dataclass field (strings under `from __future__
    import annotations`, resolved in the defining module, as typing.get_type_hints does,
    but for the fields only: a ClassVar imported in a local scope does not matter)."""
    module = vars(sys.modules.get(cls.__module__, types.ModuleType("_")))
    out = {}
    for f in dataclasses.fields(cls):
        t = f.type
        out[f.name] = eval(t, dict(module)) if isinstance(t, str) else t  # noqa: S307
    return out


def _nested(cls) -> list[tuple[dataclasses.Field, type]]:
    hints = _field_types(cls)
    return [
        (f, hints[f.name])
        for f in dataclasses.fields(cls)
        if _META not in f.metadata and dataclasses.is_dataclass(hints.get(f.name))
    ]


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _argparse_kwargs(f: dataclasses.Field, annotation) -> dict[str, Any]:
    spec: FlagSpec = f.metadata[_META]
    kwargs: dict[str, Any] = {"dest": f.name, "help": spec.help, "default": _default(f)}
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        annotation = next(a for a in args if a is not type(None))  # T | None
    if annotation is bool:
        if kwargs["default"]:
            if not option_string(f).startswith("--no-"):
                raise TypeError(f"{f.name}: a flag defaulting to True needs name='--no-...'")
            kwargs["action"] = "store_false"
        else:
            kwargs["action"] = "store_true"
        return kwargs
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        kwargs["type"] = item
        if spec.append:
            kwargs["action"] = "append"
        else:
            kwargs["nargs"] = "+"
    elif annotation in (str, int, float):
        kwargs["type"] = annotation
    else:
        raise TypeError(f"{f.name}: no command-line form for the type {annotation!r}")
    if spec.choices is not None:
        kwargs["choices"] = list(spec.choices)
    if spec.metavar is not None:
        kwargs["metavar"] = spec.metavar
    return kwargs


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls,
    overrides: dict[str, dict[str, Any]] | None = None,
    title: str | None = None,
) -> None:
    """Add the flags of dataclass `cls` (and of its nested configs) to `parser`.

    Each config becomes an argument group titled by its `FLAG_GROUP` (or `title`) when
    `parser` is a parser; into a group, flags are added directly. `overrides` maps field
    names to argparse keyword arguments that replace the generated ones."""
    overrides = overrides or {}
    hints = _field_types(cls)
    target = parser
    if isinstance(parser, argparse.ArgumentParser) and flag_fields(cls):
        target = parser.add_argument_group(title or getattr(cls, "FLAG_GROUP", cls.__name__))
    for f in dataclasses.fields(cls):
        if _META in f.metadata:
            kwargs = {**_argparse_kwargs(f, hints[f.name]), **overrides.get(f.name, {})}
            if kwargs.get("required"):
                kwargs.pop("default", None)
            spec: FlagSpec = f.metadata[_META]
            target.add_argument(option_string(f), *spec.aliases, **kwargs)
        elif dataclasses.is_dataclass(hints.get(f.name)):
            add_flags(parser, hints[f.name], overrides)


def from_args(cls, namespace: argparse.Namespace, **values: Any):
    """An instance of `cls` from parsed flags (nested configs too); `values` set the fields
    that are not flags. Lists are copied, so the namespace and the config share nothing."""
    kwargs: dict[str, Any] = {}
    for f in flag_fields(cls):
        value = getattr(namespace, f.name)
        kwargs[f.name] = list(value) if isinstance(value, list) else value
    for f, sub in _nested(cls):
        kwargs[f.name] = from_args(sub, namespace)
    kwargs.update(values)
    return cls(**kwargs)


def option_strings(cls) -> list[str]:
    """Every option string `add_flags(parser, cls)` adds, sorted (for pinning tests)."""
    out = []
    for f in flag_fields(cls):
        out += [option_string(f), *f.metadata[_META].aliases]
    for _f, sub in _nested(cls):
        out += option_strings(sub)
    return sorted(out)


__all__ = [
    "FlagSpec",
    "add_flags",
    "flag",
    "flag_fields",
    "from_args",
    "option_string",
    "option_strings",
    "tagged",
]
