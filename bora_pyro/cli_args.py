"""Command-line options generated from the fields of the config dataclasses.

Every setting is declared once, in `bora_pyro.config` (type, default, ``help`` metadata and
CLI hints); `add_options` turns the fields of a config class into argparse options, so that
``bora fit --help`` shows the same defaults and texts as the docstrings and a new field appears
on the command line without another edit. Field metadata read here:

- ``help``: the option's text;
- ``cli``: the option name to use instead of the field name (``None``: not on the command line);
- ``choices``, ``metavar``: passed to argparse.

Types (from `typing.get_type_hints`): ``bool`` becomes ``--x`` / ``--no-x``; ``int`` and
``float`` take a number, and ``'none'`` too when the field is optional (``None`` means
something there, e.g. ``--patience none``: never stop early); ``Sequence[str]`` takes one or
more words; a fixed ``tuple[float, float]`` takes two numbers; ``tau`` and ``taus`` go through
`bora_pyro.config.parse_tau`.

The actions record which options the user gave (`given`), so that only those are passed on
as overrides and the defaults live only in the config classes.

Why not ``transformers.HfArgumentParser``: importing transformers takes seconds, and
``bora --help`` must answer at once (this module imports only the standard library and the
light `bora_pyro.config`); it also cannot record which options were given.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import re
import types
import typing
from typing import Any, Callable, Iterable

from .config import parse_tau

__all__ = ["add_options", "given", "set_option_defaults", "option_name", "optional_parser", "show_default"]

_GIVEN = "_bora_given"
_OWN_DEFAULT = re.compile(r"\s*\(default[^)]*\)")


def _tau(text: str):
    try:
        return parse_tau(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


#: Fields whose values need a parser of their own (by field name); ``init_scale`` (a number or
#: ``'laplace'``) is passed on as text and parsed by `bora_pyro.config.TrainConfig`.
_PARSERS: dict[str, Callable[[str], Any]] = {"tau": _tau, "taus": _tau, "init_scale": str}


def optional_parser(convert: Callable[[str], Any], kind: str) -> Callable[[str], Any]:
    """A parser for an optional number: ``'none'`` is ``None``, anything else goes to ``convert``."""

    def parse(text: str):
        if text.strip().lower() == "none":
            return None
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind} or 'none', got {text!r}") from None

    return parse


def option_name(f: dataclasses.Field) -> str | None:
    """``--name`` of a field's option (``None`` when the field is not on the command line)."""
    name = f.metadata.get("cli", f.name)
    return None if name is None else "--" + name.replace("_", "-")


def show_default(value: Any) -> str:
    """A default as a user would type it: ``none``, ``q_proj v_proj``, ``0.001`` (a flag:
    ``on`` / ``off``)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(show_default(v) for v in value)
    return str(value)


def _help_text(text: str, default: Any, field_default: Any, shown: str | None) -> str:
    """The field's help with its default: the text's own ``(default ...)`` note is kept while
    the default is the field's, replaced when a command sets another one."""
    if shown is None and default == field_default and _OWN_DEFAULT.search(text):
        return text.replace("%", "%%")
    text = _OWN_DEFAULT.sub("", text)
    shown = show_default(default) if shown is None else shown
    return f"{text} (default: {shown})".replace("%", "%%")


def _mark(namespace: argparse.Namespace, dest: str) -> None:
    given_names = getattr(namespace, _GIVEN, set())
    given_names.add(dest)
    setattr(namespace, _GIVEN, given_names)


class _Store(argparse.Action):
    """Stores the value and records that the option was given."""

    def __init__(self, *args, text: str = "", field_default: Any = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.text, self.field_default = text, field_default

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        _mark(namespace, self.dest)


class _Flag(_Store):
    """``--x`` sets True, ``--no-x`` sets False."""

    def __init__(self, option_strings, dest, **kwargs):
        negated = [s.replace("--", "--no-", 1) for s in option_strings]
        super().__init__(option_strings + negated, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, not option_string.startswith("--no-"))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def _option_kwargs(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """argparse keywords (type, nargs, action) for a field of type ``hint``."""
    args = typing.get_args(hint)
    optional = (typing.get_origin(hint) in (typing.Union, types.UnionType)) and type(None) in args
    if optional:
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    sequence = origin in (list, collections.abc.Sequence) or (origin is tuple and args[-1:] == (Ellipsis,))
    fixed = origin is tuple and args and args[-1] is not Ellipsis
    if f.name in _PARSERS:
        return {"type": _PARSERS[f.name], **({"nargs": "+"} if sequence else {})}
    if hint is bool:
        return {"action": _Flag}
    if hint in (int, float):
        kind = "an integer" if hint is int else "a number"
        return {"type": optional_parser(hint, kind) if optional else hint}
    if hint is str:
        return {"type": str}
    if sequence and args[0] is str:
        return {"type": str, "nargs": "+"}
    if fixed and all(a in (int, float) for a in args) and len(set(args)) == 1:
        return {"type": args[0], "nargs": len(args)}
    raise TypeError(
        f"cannot make a command-line option for the field {f.name!r} of type {hint!r}; give it "
        "metadata cli=None or teach bora_pyro.cli_args._option_kwargs the type."
    )


def add_options(
    parser: Any,
    cls: type,
    *,
    skip: Iterable[str] = (),
    shown_default: str | None = None,
) -> dict[str, argparse.Action]:
    """Add one option per field of the dataclass ``cls`` (its ``dest`` is the field name).

    Parameters
    ----------
    parser
        A parser or an argument group.
    cls
        A dataclass whose fields carry ``help`` metadata (see the module docstring).
    skip
        Field names to leave out (besides those with metadata ``cli=None`` and the fields that
        hold other dataclasses).
    shown_default
        Text shown as every option's default instead of the field's (e.g. ``"from --config"``,
        where another object supplies the values); the options then default to ``None``.

    Returns
    -------
    ``{field name: its argparse action}`` for the fields that became options.
    """
    hints = typing.get_type_hints(cls)
    skip = set(skip)
    added = {}
    for f in dataclasses.fields(cls):
        name = option_name(f)
        hint = hints[f.name]
        if not f.init or name is None or f.name in skip or dataclasses.is_dataclass(hint):
            continue
        kwargs = _option_kwargs(f, hint)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TypeError(f"the field {f.name!r} has no default; give it metadata cli=None.")
        field_default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = None if shown_default else field_default
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if "metavar" in f.metadata:
            kwargs["metavar"] = f.metadata["metavar"]
        elif kwargs.get("action") is None and "choices" not in kwargs:
            kwargs["metavar"] = name[2:].replace("-", "_").upper()  # --val-docs VAL_DOCS
        kwargs.setdefault("action", _Store)
        text = f.metadata.get("help", "")
        added[f.name] = parser.add_argument(
            name, dest=f.name, default=default, text=text, field_default=field_default,
            help=_help_text(text, default, field_default, shown_default), **kwargs,
        )
    return added


def set_option_defaults(
    parser: argparse.ArgumentParser, options: dict[str, argparse.Action], **values: Any
) -> None:
    """`argparse.ArgumentParser.set_defaults` for options made by `add_options` (``options``
    is what it returned) that also shows the new defaults in ``--help`` (a command's own
    defaults, e.g. the demo's shorter run)."""
    unknown = sorted(set(values) - set(options))
    if unknown:
        raise ValueError(f"set_option_defaults: no generated option for {unknown}.")
    parser.set_defaults(**values)
    for name, value in values.items():
        action = options[name]
        action.help = _help_text(action.text, value, action.field_default, None)


def given(namespace: argparse.Namespace, names: Iterable[str] | None = None) -> dict[str, Any]:
    """The generated options the user gave on the command line, ``{field: value}``, in the
    order of ``names`` (default: all of them)."""
    chosen = getattr(namespace, _GIVEN, set())
    names = sorted(chosen) if names is None else [n for n in names if n in chosen]
    return {n: getattr(namespace, n) for n in names}
