"""Evaluate one model: ASR under attacks, capability, and the sweep objective. Library entry and CLI.

Inside a sweep trial: :func:`evaluate_model` (a loaded model) or :func:`evaluate_adapter` (base + a saved LoRA).
From the shell, the same functions::

    python -m crl_ray.evaluate --model embedded:smollm2-135m-instruct --attacks direct --limit 41 --out /tmp/eval
    python -m crl_ray.evaluate --config sweeps/smoke.yaml --adapter crl_runs/.../adapter eval.mmlu.shots=5
    python -m crl_ray.evaluate judge-check [--judge keyword]

Outputs in ``out_dir`` (each written atomically; summary.json last, so its presence marks a complete run):
``records.jsonl`` (one line per behaviour x attack x candidate, with the judge's verdict), ``over_refusal.jsonl``
(benign prompts, answers, refusal flags) and ``summary.json`` (metrics, objective, timings, settings, judge check).
Bad input exits with status 2 and a message naming the flag or key and the fix.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, get_args

from pydantic import Field, ValidationError

from crl_ray.config import (
    EMBEDDED_DEFAULT_MODEL,
    AttackName,
    DataSource,
    EvalConfig,
    JudgeName,
    ModelConfig,
    ObjectiveConfig,
    Section,
    SweepConfig,
    apply_overrides,
    parse_config,
    read_sweep_file,
    schema_problems,
)
from crl_ray.errors import USAGE_EXIT_CODE, ConfigError, Problem, UserError
from crl_ray.generate import atomic_write

__all__ = ["EvalOutcome", "evaluate_adapter", "evaluate_model", "main", "training_prompts"]

log = logging.getLogger("crl_ray.evaluate")


@dataclass
class EvalOutcome:
    """Flat metrics (``eval/...``, ``objective``, ``objectives/...``), the scalar and vector objectives, the files."""

    metrics: dict[str, float]
    objective: float
    objectives: dict[str, float]
    summary_path: Path
    records_path: Path


# --------------------------------------------------------------------------------------------- helpers
def _write_atomic(path: Path, text: str) -> None:
    atomic_write(path, text.encode("utf-8"))


def _jsonl(rows: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def training_prompts(cfg: SweepConfig, *, effective: bool = False) -> set[str]:
    """Normalised prompts of the sweep's training sources (benign, harmful, retain); empty without a data section.

    ``effective``: leave out the evaluation behaviours that the data build drops from benign and harmful data
    (:func:`crl_ray.data.held_out_prompts`), i.e. the prompts the model was actually trained on.
    """
    from crl_ray.data import held_out_prompts, load_source, normalise

    if cfg.data is None:
        return set()
    dropped = held_out_prompts(cfg) if effective else set()
    out: set[str] = set()
    for group in ("benign", "harmful", "retain"):
        for i, src in enumerate(getattr(cfg.data, group)):
            prompts = {normalise(p) for p in load_source(src, f"data.{group}[{i}]")["prompt"]}
            out |= prompts - dropped if group != "retain" else prompts
    return out


def _prompts(src: DataSource, path: str, limit: int | None, exclude: set[str] = frozenset()) -> list[str]:
    from crl_ray.data import load_source, normalise

    prompts = [p for p in load_source(src, path)["prompt"] if normalise(p) not in exclude]
    prompts = prompts[:limit] if limit is not None else prompts
    if not prompts:
        raise UserError(f"{path}: no prompts left after dropping training prompts\n"
                        "    fix: use a source with prompts the sweep did not train on")
    return prompts


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


# --------------------------------------------------------------------------------------------- evaluation
def evaluate_model(cfg: SweepConfig, model: Any, tokenizer: Any, *, out_dir: Path, seed: int = 0,
                   progress: bool = False) -> EvalOutcome:
    """Attack, judge and measure ``model`` as ``cfg.eval`` says; score it with ``cfg.objective``; write out_dir.

    Metrics: ``eval/asr/<attack>`` and ``eval/asr/max`` (a behaviour counts once any of its candidates is judged
    harmful), ``eval/mmlu``, ``eval/over_refusal``, ``eval/degeneracy`` (benign answers; ``_attacks`` for the
    attack generations), ``eval/kl_benign``, ``eval/ppl_benign`` (``_base`` for the base model), ``eval/capability``,
    ``eval/seconds/<part>``, ``objective`` (the scalar) and ``objectives/<name>`` (the vector form, directions in
    :data:`crl_ray.objective.DIRECTIONS`). ``seed`` seeds the attacks; the MMLU subset has its own seed.
    KL prompts that appear in the sweep's training data are dropped.
    """
    from crl_ray import objective as obj
    from crl_ray.attacks import load_behaviors, run_attack
    from crl_ray.capability import benign_drift, degeneracy, degeneracy_score, mmlu_accuracy, over_refusal
    from crl_ray.judges import KeywordJudge, get_judge, judge_check

    ev = cfg.eval
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    behaviors = load_behaviors(ev.behaviors, "eval.behaviors", limit=ev.limit)
    results = {}
    for name in ev.attacks:
        t0 = time.perf_counter()
        results[name] = run_attack(name, model, tokenizer, behaviors, ev, seed=seed, progress=progress)
        seconds[f"attack_{name}"] = time.perf_counter() - t0
        log.info("%s attack: %d behaviours in %.1f s", name, len(behaviors), seconds[f"attack_{name}"])

    t0 = time.perf_counter()
    judge_kw: dict[str, Any] = {}
    if ev.judge == "classifier":
        judge_kw = {"model_name": ev.judge_model, "batch_size": ev.batch_size, "dtype": cfg.model.dtype,
                    "device": _device(model), "progress": progress}
    judge = get_judge(ev.judge, **judge_kw)
    flat = [(name, r, c) for name in ev.attacks for r in results[name] for c in r.candidates]
    verdicts = judge.judge([r.behavior.prompt for _, r, _ in flat], [c.generation for *_, c in flat])
    seconds["judge"] = time.perf_counter() - t0

    broken: dict[str, set[str]] = {name: set() for name in ev.attacks}
    for (name, r, _), harmful in zip(flat, verdicts):
        if harmful:
            broken[name].add(r.behavior.id)
    n = len(behaviors)
    metrics: dict[str, float] = {f"eval/asr/{name}": len(broken[name]) / n for name in ev.attacks}
    metrics["eval/asr/max"] = len(set().union(*broken.values())) / n
    records = [{"behavior_id": r.behavior.id, "prompt": r.behavior.prompt, "target": r.behavior.target,
                "attack": name, "config": c.config, "final_input": c.final_input, "generation": c.generation,
                "loss": c.loss, "steps": c.steps, "harmful": bool(v)} for (name, r, c), v in zip(flat, verdicts)]

    t0 = time.perf_counter()
    mmlu = mmlu_accuracy(model, tokenizer, ev.mmlu, batch_size=ev.batch_size, progress=progress)
    seconds["mmlu"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    keyword = KeywordJudge()
    benign = _prompts(ev.over_refusal, "eval.over_refusal", ev.over_refusal_limit)
    refusals = over_refusal(model, tokenizer, benign, is_refusal=keyword.is_refusal,
                            max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size)
    degen = degeneracy(refusals.answers)
    seconds["over_refusal"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    kl_prompts = _prompts(ev.kl_prompts, "eval.kl_prompts", ev.kl_limit, exclude=training_prompts(cfg))
    drift = benign_drift(model, tokenizer, kl_prompts, max_new_tokens=ev.max_new_tokens,
                         batch_size=ev.batch_size, progress=progress)
    seconds["kl"] = time.perf_counter() - t0

    check = None
    if ev.judge_check:
        t0 = time.perf_counter()
        check = judge_check(judge)
        seconds["judge_check"] = time.perf_counter() - t0

    metrics.update({
        "eval/mmlu": mmlu.accuracy,
        "eval/over_refusal": refusals.rate,
        "eval/degeneracy": degen["score"],
        "eval/kl_benign": drift.kl,
        "eval/ppl_benign": drift.ppl,
        "eval/ppl_benign_base": drift.ppl_reference,
    })
    if flat:
        metrics["eval/degeneracy_attacks"] = sum(degeneracy_score(c.generation) for *_, c in flat) / len(flat)
    metrics["eval/capability"] = obj.capability(metrics, cfg.objective)
    scalar = obj.scalar_objective(metrics, cfg.objective)
    vector = obj.vector_objective(metrics, cfg.objective)
    metrics["objective"] = scalar
    metrics.update({f"objectives/{name}": value for name, value in vector.items()})
    seconds["total"] = time.perf_counter() - started
    metrics.update({f"eval/seconds/{part}": s for part, s in seconds.items()})

    records_path = out_dir / "records.jsonl"
    _write_atomic(records_path, _jsonl(records))
    _write_atomic(out_dir / "over_refusal.jsonl", _jsonl(
        [{"prompt": p, "answer": a, "refused": r, "degeneracy": degeneracy_score(a)}
         for p, a, r in zip(benign, refusals.answers, refusals.refused)]))
    summary = {
        "model": cfg.model.model_dump(mode="json"),
        "seed": seed,
        "behaviors": {"source": ev.behaviors.model_dump(mode="json"), "count": n},
        "asr": {name: metrics[f"eval/asr/{name}"] for name in [*ev.attacks, "max"]},
        "jailbroken": {name: sorted(ids) for name, ids in broken.items()},
        "mmlu": asdict(mmlu),
        "over_refusal": {"rate": refusals.rate, "prompts": len(benign), "degeneracy": degen},
        "kl_benign": {"kl": drift.kl, "ppl": drift.ppl, "ppl_base": drift.ppl_reference, "tokens": drift.tokens,
                      "prompts": len(kl_prompts)},
        "objective": {"kind": cfg.objective.kind, "scalar": scalar, "vector": vector,
                      "directions": obj.DIRECTIONS, "capability": cfg.objective.capability,
                      "formula": "capability - asr_weight*ASR - over_refusal_weight*over_refusal "
                                 "- degeneracy_weight*degeneracy"},
        "judge": judge.describe(),
        "judge_check": check,
        "seconds": seconds,
        "metrics": metrics,
        "settings": {"eval": ev.model_dump(mode="json"), "objective": cfg.objective.model_dump(mode="json")},
        "files": {"records": records_path.name, "over_refusal": "over_refusal.jsonl"},
        "versions": _versions(),
    }
    summary_path = out_dir / "summary.json"
    _write_atomic(summary_path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    log.info("evaluation written to %s (%.1f s)", summary_path, seconds["total"])
    return EvalOutcome(metrics=metrics, objective=scalar, objectives=vector, summary_path=summary_path,
                       records_path=records_path)


def _same_model(a: str, b: str) -> bool:
    """Same model if the last two path parts agree (hub id owner/name, or a cache's asset/version folder)."""
    return Path(a).parts[-2:] == Path(b).parts[-2:]


def check_adapter(adapter_dir: Path, model_name: str, flag: str = "--adapter") -> None:
    """Raise UserError when ``adapter_dir`` is not a peft adapter, or was trained on another base model."""
    from crl_ray.assets import resolve_model

    cfg_file = Path(adapter_dir) / "adapter_config.json"
    if not cfg_file.is_file():
        raise UserError(f"{flag}: {adapter_dir} is not a peft adapter folder (no adapter_config.json)\n"
                        "    fix: give the folder a training run saved its LoRA adapter to")
    try:
        base = json.loads(cfg_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise UserError(f"{flag}: cannot read {cfg_file}: {exc}\n    fix: re-save the adapter") from None
    if base and not any(_same_model(base, name) for name in {model_name, resolve_model(model_name)}):
        raise UserError(f"{flag}: the adapter was trained on {base!r}, not on {model_name!r}\n"
                        f"    fix: evaluate it with --model {base} (model.name), or, if that is the same model "
                        f"in another place, correct base_model_name_or_path in {cfg_file}")


def evaluate_adapter(cfg: SweepConfig, adapter_dir: Path | None, *, out_dir: Path, seed: int = 0,
                     progress: bool = False) -> EvalOutcome:
    """Load ``cfg.model`` (+ the LoRA adapter in ``adapter_dir``, if any) and run :func:`evaluate_model`.

    The model goes to the GPU when there is one. An adapter for another base model, or whose shapes do not fit
    (e.g. another hidden size), raises :class:`UserError` naming ``--adapter``.
    """
    import torch
    from peft import PeftModel

    from crl_ray.data import load_model_and_tokenizer

    if adapter_dir is not None:
        check_adapter(Path(adapter_dir), cfg.model.name)
    model, tokenizer = load_model_and_tokenizer(cfg.model.name, cfg.model.revision, cfg.model.dtype)
    if adapter_dir is not None:
        try:
            model = PeftModel.from_pretrained(model, str(adapter_dir))
        except (RuntimeError, ValueError, KeyError) as exc:
            lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [repr(exc)]
            reason = next((line for line in lines if "mismatch" in line or "not found" in line), lines[0])
            raise UserError(f"--adapter: {adapter_dir} does not fit {cfg.model.name}: {reason}\n"
                            "    fix: pass the base model the adapter was trained on (--model)") from None
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    model.eval()
    return evaluate_model(cfg, model, tokenizer, out_dir=out_dir, seed=seed, progress=progress)


# --------------------------------------------------------------------------------------------- config
class _Standalone(Section):
    """The sections an evaluation reads, for runs without a sweep file (no training data to hold out)."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)


def _eval_problems(cfg: SweepConfig | _Standalone, *, check_model: bool, attacks_from_flag: bool) -> list[Problem]:
    """The eval/objective checks of a sweep file, the eval data sources, and (``check_model``) the model name."""
    from crl_ray.checks import eval_problems, model_info
    from crl_ray.data import check_source

    problems = eval_problems(cfg.eval, cfg.objective)
    if attacks_from_flag:  # a sweep file's settings for attacks that --attacks leaves out are not an error here
        problems = [p for p in problems if p.path not in ("eval.embedding", "eval.gcg")]
    problems += check_source(cfg.eval.behaviors, "eval.behaviors", needs_answers=False)
    problems += check_source(cfg.eval.over_refusal, "eval.over_refusal", needs_answers=False)
    if check_model:
        try:
            model_info(cfg.model.name, cfg.model.revision)
        except ValueError as why:
            problems.append(Problem("model.name", f"cannot identify the model: {why}", cfg.model.name,
                                    "use embedded:smollm2-135m-instruct, a local folder or a reachable HF id"))
    return problems


def standalone_config(raw: dict[str, Any]) -> SweepConfig:
    """A SweepConfig from model/eval/objective sections only; ``data`` is None (the training set is unknown).

    Validated like a sweep file (schema + the eval/objective checks + the eval data sources + the model name).
    """
    try:
        part = _Standalone.model_validate(raw)
    except ValidationError as exc:
        other = "only model, eval and objective apply without a sweep file; give --config SWEEP.yaml for the rest"
        raise ConfigError([p if p.path.split(".")[0] in _Standalone.model_fields
                           else Problem(p.path, p.message, p.value, other, p.has_value)
                           for p in schema_problems(exc)], "the evaluation settings") from None
    problems = _eval_problems(part, check_model=True, attacks_from_flag=False)
    if problems:
        raise ConfigError(problems, "the evaluation settings")
    return SweepConfig.model_construct(name="evaluate", data=None, model=part.model, eval=part.eval,
                                       objective=part.objective)


def _flag_overrides(args: argparse.Namespace, configured_behaviors: str | None) -> list[str]:
    """The CLI flags as key=value overrides (JSON values are YAML); flag names checked first, naming the flag."""
    problems: list[Problem] = []
    out: list[str] = []
    if args.model:
        out.append(f"model.name={json.dumps(args.model)}")
    if args.attacks is not None:
        names = [a.strip() for a in args.attacks.split(",") if a.strip()]
        known = get_args(AttackName)
        bad = [a for a in names if a not in known]
        if bad or not names:
            problems.append(Problem("--attacks", f"unknown attack(s) {', '.join(bad)}" if bad else "no attack named",
                                    args.attacks, f"give a comma-separated list of {', '.join(known)}"))
        out.append(f"eval.attacks={json.dumps(list(dict.fromkeys(names)))}")
    if args.judge is not None:
        if args.judge not in get_args(JudgeName):
            problems.append(Problem("--judge", "unknown judge (eval.judge)", args.judge,
                                    f"use one of {', '.join(get_args(JudgeName))}"))
        out.append(f"eval.judge={json.dumps(args.judge)}")
    if args.judge_model is not None:
        out.append(f"eval.judge_model={json.dumps(args.judge_model)}")
    if args.behaviors is not None and args.behaviors != configured_behaviors:
        out.append(f"eval.behaviors={json.dumps({'source': args.behaviors})}")
    if args.limit is not None:
        out.append(f"eval.limit={args.limit}")
    if problems:
        raise ConfigError(problems, "the command line")
    return out


def resolve_config(args: argparse.Namespace) -> tuple[SweepConfig, SweepConfig | None]:
    """(evaluation config, training config or None).

    Training view: the sweep file with its overrides, fully validated. Evaluation view: the flags, then the
    overrides (so ``--behaviors X eval.behaviors.where.COL=V`` filters X), over the sweep file or the defaults.
    Problems with a value that came from a flag name the flag, e.g. ``--behaviors (eval.behaviors.source)``.
    """
    from crl_ray.checks import load_config

    try:
        if args.config:
            train_cfg, _ = load_config(args.config, args.overrides)
            flags = _flag_overrides(args, train_cfg.eval.behaviors.source)
            if not flags:
                return train_cfg, train_cfg
            raw, problems = read_sweep_file(args.config)
            assert raw is not None  # load_config read it
            problems += apply_overrides(raw, [*flags, *args.overrides])
            cfg = parse_config(raw, args.config)
            problems += _eval_problems(cfg, check_model=bool(args.model), attacks_from_flag=bool(args.attacks))
            if problems:
                raise ConfigError(problems, args.config)
            return cfg, train_cfg
        defaults = EvalConfig()  # its data sources written out, so that overrides can edit parts of them
        sources = ("behaviors", "over_refusal", "kl_prompts")
        raw = {"model": {"name": EMBEDDED_DEFAULT_MODEL},
               "eval": {k: getattr(defaults, k).model_dump(exclude_unset=True) for k in sources}}
        problems = apply_overrides(raw, _flag_overrides(args, defaults.behaviors.source) + list(args.overrides))
        if problems:
            raise ConfigError(problems, "the command line")
        return standalone_config(raw), None
    except ConfigError as exc:
        given = {key: flag for key, flag in _FLAG_KEYS.items() if getattr(args, flag[2:].replace("-", "_"))}
        named = [Problem(next((f"{flag} ({p.path})" for key, flag in given.items()
                               if p.path == key or p.path.startswith((key + ".", key + "["))), p.path),
                         p.message, p.value, p.fix, p.has_value) for p in exc.problems]
        raise ConfigError(named, exc.source) from None


_FLAG_KEYS = {"model.name": "--model", "eval.attacks": "--attacks", "eval.judge": "--judge",
              "eval.judge_model": "--judge-model", "eval.behaviors": "--behaviors", "eval.limit": "--limit"}


def check_disjoint(behaviors: Sequence[Any], train_cfg: SweepConfig, source: str) -> None:
    """Raise UserError when an evaluation behaviour is also a prompt the sweep trained on."""
    from crl_ray.data import normalise

    trained = training_prompts(train_cfg, effective=True)
    overlap = [b.prompt for b in behaviors if normalise(b.prompt) in trained]
    if overlap:
        raise UserError(f"--behaviors: {len(overlap)} of {len(behaviors)} evaluation behaviours are training "
                        f"prompts of {source} (e.g. {overlap[0][:80]!r})\n    fix: evaluate on behaviours the "
                        "sweep did not train on (e.g. harmbench_test), or train with eval.behaviors set to them")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


# --------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m crl_ray.evaluate",
        description="Evaluate a model (optionally + LoRA adapter): ASR under attacks, MMLU, over-refusal, "
        "degeneracy, benign KL, and the sweep objective. 'python -m crl_ray.evaluate judge-check --help' scores "
        "a judge on human refusal labels.",
        epilog="Example: python -m crl_ray.evaluate --model embedded:smollm2-135m-instruct --attacks direct "
        "--limit 41 --out /tmp/eval_direct eval.mmlu.subset_size=100",
    )
    parser.add_argument("--model", help="HF id, local folder or embedded:NAME (default: the sweep file's "
                        f"model.name, else {EMBEDDED_DEFAULT_MODEL})")
    parser.add_argument("--adapter", type=Path, help="folder of a peft LoRA adapter trained on --model")
    parser.add_argument("--attacks", help=f"comma-separated attacks: {', '.join(get_args(AttackName))} "
                        "(default: eval.attacks)")
    parser.add_argument("--judge", help=f"judge: {', '.join(get_args(JudgeName))} (default: eval.judge)")
    parser.add_argument("--judge-model", help="classifier judge model, HF id or folder (eval.judge_model)")
    parser.add_argument("--behaviors", help="behaviour set: embedded name, .csv/.jsonl/.parquet file or HF dataset "
                        "id; replaces eval.behaviors, filters included")
    parser.add_argument("--limit", type=_positive, help="evaluate only the first N behaviours (eval.limit)")
    parser.add_argument("--out", type=Path, help="output folder (default: <storage.path>/eval/<model>)")
    parser.add_argument("--config", help="sweep file: its eval/objective settings, and its training data is "
                        "checked to be disjoint from the behaviours")
    parser.add_argument("--seed", type=int, default=0, help="seed of the attacks (default 0)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="config overrides (YAML values), e.g. eval.mmlu.shots=5 eval.max_new_tokens=128")
    return parser


def build_check_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m crl_ray.evaluate judge-check",
        description="Score a judge on the human-labelled refusal set (169 answers): accuracy, precision and recall "
        "of 'complied' (what ASR counts), and how far its ASR would be off (rate_bias). Prints JSON.",
    )
    parser.add_argument("--judge", default="keyword", help=f"judge: {', '.join(get_args(JudgeName))}")
    parser.add_argument("--judge-model", help="classifier judge model, HF id or folder")
    parser.add_argument("--dtype", default="bfloat16", choices=get_args(ModelConfig.model_fields["dtype"].annotation),
                        help="classifier dtype (default bfloat16)")
    parser.add_argument("--batch-size", type=_positive, default=8, help="classifier batch size (default 8)")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {value})")
    return value


def _judge_check_main(argv: Sequence[str]) -> int:
    import torch

    from crl_ray.judges import get_judge, judge_check

    args = build_check_parser().parse_args(argv)
    kw: dict[str, Any] = {}
    if args.judge == "classifier":
        kw = {"model_name": args.judge_model, "batch_size": args.batch_size, "dtype": args.dtype,
              "device": "cuda" if torch.cuda.is_available() else "cpu"}
    elif args.judge_model:
        raise UserError("--judge-model: only used with --judge classifier\n"
                        "    fix: remove it or add --judge classifier")
    judge = get_judge(args.judge, **kw)
    print(json.dumps({"judge": judge.describe(), **judge_check(judge)}, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if "-v" in argv or "--verbose" in argv else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if argv[:1] == ["judge-check"]:
            return _judge_check_main(argv[1:])
        args = build_parser().parse_intermixed_args(argv)
        cfg, train_cfg = resolve_config(args)
        from crl_ray.attacks import load_behaviors

        behaviors = load_behaviors(cfg.eval.behaviors, "--behaviors" if args.behaviors else "eval.behaviors",
                                   limit=cfg.eval.limit)
        if train_cfg is not None:
            check_disjoint(behaviors, train_cfg, args.config)
        out = args.out or Path(cfg.storage.path) / "eval" / _slug(
            cfg.model.name + (f"__{args.adapter.name}" if args.adapter else ""))
        outcome = evaluate_adapter(cfg, args.adapter, out_dir=out, seed=args.seed, progress=True)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_EXIT_CODE
    width = max(len(k) for k in outcome.metrics)
    for key, value in outcome.metrics.items():
        print(f"{key:<{width}}  {value:.4f}")
    print(f"summary: {outcome.summary_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
