"""Map `--field value` flags and an optional JSON config file onto a stage's config dataclass.

Every field of the dataclass becomes a flag (`samples_per_shard` -> `--samples-per-shard`); a field without a
default is required; `metadata={"choices": ..., "help": ...}` on a field is used as is. A field without a
"help" is described in `--help` by its comment in the source: the one after it on its line, else the comment
lines right above it up to their first full stop (so the comments the configs carry are what users read).
`--config FILE` loads JSON whose keys must be field names (unknown keys are rejected) and whose values must
have the field's type (a JSON boolean for a bool: the string "false" is an error, not true); flags given on
the command line win.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import math
import re
import textwrap
import tokenize
import types
import typing
from typing import Any

from pipeline.errors import UsageError


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(scalar type, is_optional) of an annotation such as `int`, `str | None` or `Optional[float]`."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_BOOL_WORDS = {*_TRUE, *_FALSE}


def _parse_bool(s: str) -> bool:
    if s.lower() in _TRUE:
        return True
    if s.lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got '{s}'")


def _finite_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{s}'") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got '{s}'")
    return v


def field_comments(cls: type) -> dict[str, str]:
    """{field: its comment} over `cls` and the dataclasses it extends (a subclass's comment wins)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(_own_field_comments(klass))
    return out


def _own_field_comments(cls: type) -> dict[str, str]:
    """{field: its comment} from `cls`'s source: the comment after the field on its last line, else the first
    sentence of the comment lines right above it. Empty where the source cannot be read (flags then have no
    help)."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
        tree = ast.parse(src)
        tokens = list(tokenize.generate_tokens(io.StringIO(src).readline))
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):
        return {}
    comment = {t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT}
    code = {t.start[0] for t in tokens if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE)}
    out = {}
    for node in tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        last = node.end_lineno or node.lineno
        text = " ".join(comment[n] for n in range(node.lineno, last + 1) if n in comment and n in code)
        if not text:  # the comment-only lines right above the field
            above, line = [], node.lineno - 1
            while line in comment and line not in code:
                above.insert(0, comment[line])
                line -= 1
            text = re.split(r"(?<=\.)\s+(?=[A-Z])", " ".join(above), maxsplit=1)[0]  # its first sentence
        if text:
            out[node.target.id] = text
    return out


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, positional: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    parser.add_argument("--config", help="JSON file of settings; flags given here override it")
    for f in dataclasses.fields(cls):
        tp, optional = _base_type(hints[f.name])
        text = f.metadata.get("help", comments.get(f.name, ""))
        text = text.replace("%", "%%")  # argparse formats help strings with %
        kw: dict[str, Any] = {"help": text, "default": argparse.SUPPRESS}
        if "choices" in f.metadata:
            kw["choices"] = list(f.metadata["choices"])
        if tp is bool:
            kw.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
        elif tp is float:
            kw["type"] = _finite_float
        elif tp in (int, str):
            kw["type"] = tp
        elif typing.get_origin(tp) in (list, tuple):  # list[str]: one or more values after the flag; given
            kw.update(nargs="+", type=typing.get_args(tp)[0], action="extend")  # twice, both lists count
        # a positional is optional here: `--config` may give it (build_config says when neither does)
        if f.name in positional:
            parser.add_argument(f.name, nargs="?", **{k: v for k, v in kw.items() if k != "nargs"})
            parser.set_defaults(_positional=positional)
            continue
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if has_default:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kw["help"] = f"{kw['help']} (default: {default})".strip()
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, dest=f.name, **kw)
        parser.flags = getattr(parser, "flags", set()) | {flag}
        if tp is bool:
            parser.bool_flags = getattr(parser, "bool_flags", set()) | {flag}


def explicit_bools(flags: set[str], args: list[str], every: set[str] = frozenset()) -> list[str]:
    """``args`` with each bare bool flag among ``flags`` written ``--flag=true``, unless a true/false word
    follows it: argparse would otherwise take the next argument for its value (`validate --check-tars STORE`
    read STORE as the bool and failed). A flag shortened as argparse allows (the start of one of ``every``
    flag only) counts as the flag it names."""
    out = list(args)
    for i, a in enumerate(out):
        if a == "--":
            break
        named = [f for f in every if f.startswith(a)] if a.startswith("--") and a not in flags else [a]
        if len(named) == 1 and named[0] in flags:
            nxt = out[i + 1].lower() if i + 1 < len(out) else ""
            if nxt not in _BOOL_WORDS:
                out[i] = f"{named[0]}=true"
    return out


_JSON_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _json_kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"the boolean {str(v).lower()}"
    if isinstance(v, str):
        return f"the string {json.dumps(v)}"
    return f"{type(v).__name__} {json.dumps(v)[:40]}"


def _check_value(name: str, tp: Any, optional: bool, v: Any, source: str) -> Any:
    """``v`` as the field's type, or a UsageError naming the key, the expected type and what was given."""
    if v is None and optional:
        return v
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        inner = typing.get_args(tp)[0]
        if not isinstance(v, list) or not v:
            raise UsageError(f"{source}: '{name}' must be a non-empty list, got {_json_kind(v)}")
        return [_check_value(name, inner, False, x, source) for x in v]
    ok = {
        bool: isinstance(v, bool),
        int: isinstance(v, int) and not isinstance(v, bool),
        float: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: isinstance(v, str),
    }.get(tp, True)
    if not ok:
        raise UsageError(f"{source}: '{name}' must be {_JSON_NAMES.get(tp, tp)}, got {_json_kind(v)}")
    if tp is float:
        try:
            v = float(v)
        except OverflowError:  # a JSON integer beyond float range
            raise UsageError(f"{source}: '{name}' must be a finite number, got {_json_kind(v)}") from None
        if not math.isfinite(v):
            raise UsageError(f"{source}: '{name}' must be a finite number, got {v}")
    return v


def _load_config_file(path: str) -> dict[str, Any]:
    try:
        with open(path) as fh:
            values = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read --config {path}: {e}") from e
    if not isinstance(values, dict):
        raise UsageError(
            f"--config {path} must hold a JSON object of settings (got {type(values).__name__ if values is not None else 'null'})"
        )
    return values


def build_config(cls: type, args: argparse.Namespace) -> Any:
    """The dataclass from `--config` (if any) overlaid with the flags that were given, every value checked
    against the field's type before anything runs."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values = _load_config_file(args.config)
        unknown = sorted(set(values) - names)
        if unknown:
            raise UsageError(
                f"unknown keys in {args.config}: {', '.join(unknown)}; valid: {', '.join(sorted(names))}"
            )
        hints = typing.get_type_hints(cls)
        choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(cls)}
        for k, v in list(values.items()):
            values[k] = _check_value(k, *_base_type(hints[k]), v, f"--config {args.config}")
            if choices[k] is not None and values[k] not in choices[k]:
                raise UsageError(
                    f"--config {args.config}: unknown {k} '{values[k]}'; valid: {', '.join(map(str, choices[k]))}"
                )
    values.update({k: v for k, v in vars(args).items() if k in names})
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        positional = getattr(args, "_positional", ())
        raise UsageError(
            "missing required setting(s): "
            + ", ".join(m.upper() if m in positional else "--" + m.replace("_", "-") for m in missing)
        )
    for k, v in values.items():  # torch's generators take 64 bits: a larger seed failed after models loaded
        if (k == "seed" or k.endswith("_seed")) and isinstance(v, int) and not 0 <= v < SEED_LIMIT:
            raise UsageError(f"--{k.replace('_', '-')} must be in [0, 2**63) (got {v})")
    return cls(**values)


SEED_LIMIT = 2**63
