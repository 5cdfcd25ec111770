"""Reading sweep files (``extends:``), ``key.path=value`` / ``~key.path`` overrides, parsing and dumping.

``crl_ray.validate.load_config`` is the one entry point that also runs the semantic checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from crl_ray.config.problems import schema_problems
from crl_ray.config.schema import (
    EmbeddingAttackConfig,
    LayerSpec,
    SweepConfig,
)
from crl_ray.errors import ConfigError, Problem


def read_sweep_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> tuple[dict | None, list[Problem]]:
    """The mapping of a sweep file with its ``extends:`` chain merged in (mappings merge, the rest replaces)."""
    data, problems = read_yaml(path)
    if data is None or "extends" not in data:
        return data, problems
    parent = data.pop("extends")
    if not isinstance(parent, str) or not parent:
        return None, [Problem("extends", "must be the path of another sweep file", parent,
                              fix="write e.g. extends: paper.yaml (relative to this file)")]
    parent_path = (Path(path).parent / parent).resolve()
    if parent_path in _seen or parent_path == Path(path).resolve():
        return None, [Problem("extends", "sweep files extend each other in a cycle", parent, fix="break the cycle")]
    base, base_problems = read_sweep_file(parent_path, _seen + (Path(path).resolve(),))
    if base is None:
        return None, [Problem(f"extends ({parent})", pr.message, pr.value, pr.fix, pr.has_value)
                      for pr in base_problems]
    return deep_merge(base, data), problems


def deep_merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``: nested mappings merge key by key, every other value replaces."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> tuple[dict | None, list[Problem]]:
    """The mapping in a sweep file, or the problems that stop it being read."""
    p = Path(path)
    where = str(path)
    if not p.exists():
        return None, [Problem(where, "file not found", has_value=False, fix="check the path of the sweep file")]
    if not p.is_file():
        return None, [Problem(where, "not a file", has_value=False, fix="give the path of a .yaml sweep file")]
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem(where, f"cannot read the file: {exc}", has_value=False, fix="check its permissions")]
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        loc = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        return None, [
            Problem(where, f"invalid YAML{loc}: {reason}", has_value=False, fix="fix the YAML syntax there")
        ]
    if data is None:
        return None, [Problem(where, "the file is empty", has_value=False, fix="start from sweeps/smoke.yaml")]
    if not isinstance(data, dict):
        return None, [
            Problem(where, "the top level must be a mapping of sections", value=type(data).__name__,
                    fix="start from sweeps/smoke.yaml")
        ]
    return data, []


def apply_overrides(data: dict, overrides: list[str]) -> list[Problem]:
    """Apply ``key.path=value`` overrides in place (values parsed as YAML), in order; returns problems.

    ``~key.path`` removes the key (its default applies again), e.g. ``~eval.embedding`` or ``~loss`` followed by
    ``loss.kind=circuit_breakers`` (the Hydra convention).
    """
    problems: list[Problem] = []
    for item in overrides:
        if item.startswith("~"):
            problems += _remove_key(data, item[1:], item)
            continue
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(Problem(f"override {item!r}", "expected key.path=value", has_value=False,
                                    fix="write e.g. loss.margin_benign=300 or train.steps=10"))
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                problems.append(Problem(".".join(parts[: i + 1]), "is not a section, cannot set keys inside it",
                                        value=nxt, fix=f"override {'.'.join(parts[: i + 1])}=... as a whole"))
                break
            node = nxt
        else:
            node[parts[-1]] = value
    return problems


def _remove_key(data: dict, key: str, item: str) -> list[Problem]:
    parts = key.split(".")
    if not key or "=" in key or any(not part for part in parts):
        return [Problem(f"override {item!r}", "expected ~key.path (remove a key)", has_value=False,
                        fix="write e.g. ~eval.embedding or ~loss")]
    node = data
    for i, part in enumerate(parts[:-1]):
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return [Problem(".".join(parts[: i + 1]), f"nothing to remove: {key} is not set", has_value=False,
                            fix=f"remove the override {item!r}")]
    if parts[-1] not in node:
        return [Problem(key, "nothing to remove: the key is not set", has_value=False,
                        fix=f"remove the override {item!r}")]
    del node[parts[-1]]
    return []


def parse_config(data: dict, source: str = "") -> SweepConfig:
    """Validate a raw mapping against the schema; raise ConfigError with every problem."""
    try:
        return SweepConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(schema_problems(exc), source) from None


def dump_config(cfg: SweepConfig) -> dict:
    """A plain mapping of the resolved config that ``parse_config`` reads back to an equal config."""
    return _plain(cfg)


def _plain(value: Any) -> Any:
    if isinstance(value, LayerSpec):
        return value.to_yaml()
    if isinstance(value, EmbeddingAttackConfig) and value.configs != "single":
        # lr, early_stop_loss and init belong to configs: single; written out they would be rejected on re-reading
        return {name: _plain(getattr(value, name)) for name in type(value).model_fields
                if name not in EmbeddingAttackConfig.SINGLE_ONLY}
    if isinstance(value, BaseModel):
        return {name: _plain(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value



# ============================================================================================ reference
