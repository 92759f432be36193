"""Map `--field value` flags and an optional JSON config file onto a stage's config dataclass.

Every field of the dataclass becomes a flag (`samples_per_shard` -> `--samples-per-shard`); a field without a
default is required; `metadata={"choices": ..., "help": ...}` on a field is used as is. `--config FILE` loads
JSON whose keys must be field names (unknown keys are rejected); flags given on the command line win.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got '{s}'")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, positional: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    parser.add_argument("--config", help="JSON file of settings; flags given here override it")
    for f in dataclasses.fields(cls):
        tp, optional = _base_type(hints[f.name])
        kw: dict[str, Any] = {"help": f.metadata.get("help", ""), "default": argparse.SUPPRESS}
        if "choices" in f.metadata:
            kw["choices"] = list(f.metadata["choices"])
        if tp is bool:
            kw.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
        elif tp in (int, float, str):
            kw["type"] = tp
        elif typing.get_origin(tp) in (list, tuple):  # list[str]: one or more values after the flag
            kw.update(nargs="+", type=typing.get_args(tp)[0])
        if f.name in positional:
            parser.add_argument(f.name, **{k: v for k, v in kw.items() if k != "default"})
            continue
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if has_default:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kw["help"] = f"{kw['help']} (default: {default})".strip()
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)


def build_config(cls: type, args: argparse.Namespace) -> Any:
    """The dataclass from `--config` (if any) overlaid with the flags that were given."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        try:
            with open(args.config) as fh:
                values = json.load(fh)
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"cannot read --config {args.config}: {e}") from e
        unknown = sorted(set(values) - names)
        if unknown:
            raise UsageError(
                f"unknown keys in {args.config}: {', '.join(unknown)}; valid: {', '.join(sorted(names))}"
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
        raise UsageError(
            "missing required setting(s): " + ", ".join("--" + m.replace("_", "-") for m in missing)
        )
    return cls(**values)
