"""Schema errors as problem reports: the dotted key, what was wrong, the value and a fix."""

from __future__ import annotations

import difflib
import re
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from crl_ray.config.schema import (
    SweepConfig,
)
from crl_ray.errors import Problem

_TAG_RE = re.compile(r"^(literal\[.*|list\[.*|dict\[.*|tuple\[.*|int|float|str|bool|function-.*|[A-Z]\w*)$")


def format_loc(loc: tuple) -> str:
    """('data', 'benign', 0, 'source') -> 'data.benign[0].source'; dotted dict keys are bracketed."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "." in str(part):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _clean_loc(loc: tuple, is_extra: bool) -> tuple:
    # pydantic puts union-member tags (e.g. "literal['all','target']", "LayerSpec", "float") into locations
    keep = []
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(part, str) and _TAG_RE.match(part) and not (last and is_extra):
            continue
        keep.append(part)
    return tuple(keep)


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The section model that holds the key at ``loc`` (for suggestions), following nested sections."""
    model: Any = SweepConfig
    for part in loc[:-1]:
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _section_type(field.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _section_type(annotation: Any) -> Any:
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
        for inner in get_args(candidate):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return annotation


_FIXES = {
    "missing": "add this key",
    "int_parsing": "write a whole number",
    "int_type": "write a whole number",
    "int_from_float": "write a whole number",
    "float_parsing": "write a number",
    "float_type": "write a number",
    "bool_parsing": "write true or false",
    "bool_type": "write true or false",
    "string_type": "write a string",
    "list_type": "write a YAML list, e.g. [a, b]",
    "dict_type": "write a mapping of key: value",
    "model_type": "write a mapping of key: value",
    "model_attributes_type": "write a mapping of key: value",
    "tuple_type": "write a list of two values, e.g. [1, 5]",
    "too_short": "add entries",
    "too_long": "remove entries",
    "string_too_short": "write a longer value (or null where the key allows none)",
    "union_tag_invalid": "set type to one of float, int, categorical, layer_window",
    "union_tag_not_found": "add type: float | int | categorical | layer_window",
}


def schema_problems(exc: ValidationError) -> list[Problem]:
    """Turn pydantic's errors into problems, merging the branches of one union into one message."""
    merged: dict[str, Problem] = {}
    for err in exc.errors():
        kind = err["type"]
        loc = _clean_loc(tuple(err["loc"]), kind == "extra_forbidden")
        path = format_loc(loc)
        msg = err["msg"]
        fix = _FIXES.get(kind, "")
        if msg.startswith("Value error, "):  # our validators write "what is wrong; how to fix it"
            msg, _, fix = msg[len("Value error, "):].partition("; ")
        has_value = kind != "missing"
        value = err.get("input")
        if kind == "extra_forbidden":
            msg = "unknown key"
            model = _model_at(loc)
            if model is not None:
                known = list(model.model_fields)
                close = difflib.get_close_matches(str(loc[-1]), known, n=1)
                fix = (f"did you mean '{close[0]}'? " if close else "") + "known keys here: " + ", ".join(known)
            else:
                fix = "remove it"
            has_value = False
        elif kind == "literal_error":
            fix = f"use one of {err.get('ctx', {}).get('expected', '')}"
        elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            fix = "use a value in that range"
        elif kind.endswith("_type") and kind.startswith("model"):
            pass
        if path in merged and merged[path].message != msg:
            old = merged[path]
            merged[path] = Problem(path, f"{old.message}; or {msg}", value, "; or ".join(f for f in (old.fix, fix) if f),
                                   has_value)
        elif path not in merged:
            merged[path] = Problem(path, msg, value, fix, has_value)
    return list(merged.values())


