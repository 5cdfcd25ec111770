"""``python -m crl_ray.evaluate``: evaluate a model or an adapter from the shell, or check a judge.

Settings come from a sweep file (``--config``) or from flags alone (a typed standalone config); bad input exits
with status 2 and a message naming the flag or key and the fix.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from pydantic import ValidationError

from crl_ray.config import (
    EMBEDDED_DEFAULT_MODEL,
    FOLLOW_UP_QUESTION,
    AttackName,
    EvalConfig,
    JudgeName,
    ModelConfig,
    StorageConfig,
    SweepConfig,
    apply_overrides,
    parse_config,
    read_sweep_file,
    schema_problems,
)
from crl_ray.errors import USAGE_EXIT_CODE, ConfigError, Problem, UserError
from crl_ray.evaluate.run import (
    STANDALONE_SECTIONS,
    EvalSettings,
    evaluate_adapter,
    training_prompts,
)
from crl_ray.storage import atomic_write

log = logging.getLogger("crl_ray.evaluate")

# --------------------------------------------------------------------------------------------- config
def _eval_problems(cfg: SweepConfig | EvalSettings, *, check_model: bool, attacks_from_flag: bool) -> list[Problem]:
    """The eval/objective checks of a sweep file, the eval data sources, and (``check_model``) the model name."""
    from crl_ray.data import check_source
    from crl_ray.validate import eval_problems, model_info

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


def standalone_config(raw: dict[str, Any]) -> EvalSettings:
    """Evaluation settings from model/eval/objective sections only (no training data is known to hold out).

    Validated like a sweep file (schema + the eval/objective checks + the eval data sources + the model name).
    """
    other = "only model, eval and objective apply without a sweep file; give --config SWEEP.yaml for the rest"
    problems = [Problem(key, "not an evaluation setting", raw[key], other) for key in raw
                if key not in STANDALONE_SECTIONS]
    try:
        settings = EvalSettings.model_validate({k: v for k, v in raw.items() if k in STANDALONE_SECTIONS})
    except ValidationError as exc:
        raise ConfigError(problems + schema_problems(exc), "the evaluation settings") from None
    problems += _eval_problems(settings, check_model=True, attacks_from_flag=False)
    if problems:
        raise ConfigError(problems, "the evaluation settings")
    return settings


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


def resolve_config(args: argparse.Namespace) -> tuple[SweepConfig | EvalSettings, SweepConfig | None]:
    """(evaluation config, training config or None).

    Training view: the sweep file with its overrides, fully validated. Evaluation view: the flags, then the
    overrides (so ``--behaviors X eval.behaviors.where.COL=V`` filters X), over the sweep file or the defaults.
    Problems with a value that came from a flag name the flag, e.g. ``--behaviors (eval.behaviors.source)``.
    """
    from crl_ray.validate import load_config

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


HARMBENCH_SOURCES = ("harmbench_val", "harmbench_test")


def warn_non_standard(src: Any, count: int, limit: int | None) -> int:
    """Warn when an embedded HarmBench set is used without the standard-behaviour filter: its contextual and
    copyright behaviours carry a context string (or a copyrighted text) that the attacks do not use, so their ASR
    is not comparable. Returns how many of the ``count`` behaviours are not standard ones."""
    if src.source not in HARMBENCH_SOURCES or "FunctionalCategory" in src.where or limit is not None:
        return 0
    from crl_ray.config import DataSource
    from crl_ray.evaluate.attacks import load_behaviors

    standard = len(load_behaviors(DataSource(source=src.source, where={"FunctionalCategory": "standard"})))
    other = count - standard
    if other > 0:
        log.warning("%d of the %d %s behaviours are contextual or copyright ones, whose context the attacks do not "
                    "use; for the %d standard ones (eval.behaviors' default) add "
                    "eval.behaviors.where.FunctionalCategory=standard, or set eval.behaviors.source=%s to keep the "
                    "config's filter", other, count, src.source, standard, src.source)
    return other


def check_disjoint(behaviors: Sequence[Any], train_cfg: SweepConfig, source: str) -> None:
    """Raise UserError when an evaluation behaviour is also a prompt the sweep trained on."""
    from crl_ray.data import normalise

    trained = training_prompts(train_cfg, effective=True)
    overlap = [b.prompt for b in behaviors if normalise(b.prompt) in trained]
    if overlap:
        raise UserError(f"--behaviors: {len(overlap)} of {len(behaviors)} evaluation behaviours are training "
                        f"prompts of {source} (e.g. {overlap[0][:80]!r})\n    fix: evaluate on behaviours the "
                        "sweep did not train on (e.g. harmbench_test), or train with eval.behaviors set to them")


def default_out_dir(root: Path, model: str, adapter: Path | None) -> Path:
    """<root>/<model>[__<adapter's run>_<checkpoint>], never an existing evaluation: -2, -3, ... are appended, so
    evaluating adapters of several runs (all folders named "adapter") or one adapter twice keeps every result."""
    name = model
    if adapter is not None:
        parts = Path(adapter).expanduser().resolve().parts
        name += "__" + "_".join(p for p in parts[-3:] if p != "adapter")
    base = root / _slug(name)
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


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
                        "id; replaces eval.behaviors, filters included (an embedded HarmBench set without a FunctionalCategory "
                        "filter is warned about: its contextual and copyright behaviours' context is not used)")
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
        description="Measure a judge on the embedded human labels: objective_labels (395 answers: did the response "
        "carry out the request), refusal_labels (169: did it comply; answering another question counts as a "
        "refusal) and smollm2_labels (429 of the embedded SmolLM2's answers, base and defended, labelled by the "
        "project). Accuracy, false-positive and false-negative rates and the ASR bias (judged rate - human rate), "
        "each with a 95% interval. The probe judge is fitted on objective_labels and smollm2_labels, so its "
        "figures there are cross-validated (grouped by request) and refusal_labels is held out; the first run fits "
        "it (a few minutes) and caches it. Prints JSON.",
        epilog="Example: python -m crl_ray.evaluate judge-check --judge keyword",
    )
    parser.add_argument("--judge", default="probe", help=f"judge: {', '.join(get_args(JudgeName))} (default probe)")
    parser.add_argument("--judge-model", help="probe: the frozen judge LM (default the embedded SmolLM2); "
                        "classifier: the classifier model, HF id or folder (required)")
    parser.add_argument("--dtype", default="bfloat16", choices=get_args(ModelConfig.model_fields["dtype"].annotation),
                        help="classifier dtype (default bfloat16)")
    parser.add_argument("--batch-size", type=_positive, default=8, help="judge batch size (default 8)")
    parser.add_argument("--answer-tokens", type=_positive, default=128,
                        help="probe: answers are judged (and measured) cut to this many tokens; use the "
                        "evaluation's eval.max_new_tokens (default 128)")
    question = parser.add_mutually_exclusive_group()
    question.add_argument("--question", type=_nonempty,
                          help="probe: a follow-up question asked of the judge LM after each answer; use the "
                          "evaluation's eval.judge_question (default none)")
    question.add_argument("--follow-up", dest="question", action="store_const", const=FOLLOW_UP_QUESTION,
                          help=f"probe: the measured follow-up question, {FOLLOW_UP_QUESTION!r}")
    parser.add_argument("--out", type=Path, help="also write the report to this JSON file")
    return parser


def _nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (leave --question out for none)")
    return text


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {value})")
    return value


def _judge_check_main(argv: Sequence[str]) -> int:
    import torch

    from crl_ray.evaluate.judges import check_summary, judge_check
    from crl_ray.evaluate.registry import get_judge

    args = build_check_parser().parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.question is not None and args.judge != "probe":
        raise UserError(f"--question/--follow-up: the {args.judge} judge asks no follow-up question\n"
                        "    fix: remove the flag, or add --judge probe")
    if args.judge == "classifier":
        if not args.judge_model:
            raise UserError("--judge-model: the classifier judge needs a model\n"
                            "    fix: add --judge-model with an HF id or folder, e.g. cais/HarmBench-Llama-2-13b-cls")
        judge = get_judge("classifier", model_name=args.judge_model, batch_size=args.batch_size, dtype=args.dtype,
                          device=device)
    elif args.judge == "probe":
        judge = get_judge("probe", model_name=args.judge_model, batch_size=args.batch_size, device=device,
                          max_answer_tokens=args.answer_tokens, question=args.question, progress=True)
    elif args.judge_model:
        raise UserError("--judge-model: the keyword judge uses no model\n"
                        "    fix: remove --judge-model, or add --judge probe or --judge classifier")
    else:
        judge = get_judge(args.judge)
    try:
        report = {"judge": judge.describe(), "summary": None, **judge_check(judge)}
    except UserError as exc:  # the judge names its config key; here the user typed the flag
        raise UserError(str(exc).replace("set eval.judge_model to", "pass --judge-model").replace(
            "eval.judge_model", "--judge-model")) from None
    report["summary"] = check_summary(report)
    text = json.dumps(report, indent=2, default=float)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, (text + "\n").encode("utf-8"))
    print(text)
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
        from crl_ray.evaluate.attacks import load_behaviors

        behaviors = load_behaviors(cfg.eval.behaviors, "--behaviors" if args.behaviors else "eval.behaviors",
                                   limit=cfg.eval.limit)
        warn_non_standard(cfg.eval.behaviors, len(behaviors), cfg.eval.limit)
        if train_cfg is not None:
            check_disjoint(behaviors, train_cfg, args.config)
        root = Path(train_cfg.storage.path if train_cfg is not None else StorageConfig().path).expanduser()
        out = args.out or default_out_dir(root / "eval", cfg.model.name, args.adapter)
        log.info("writing the evaluation to %s", out)
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
