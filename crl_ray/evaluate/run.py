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

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import Field

from crl_ray.config import (
    DataConfig,
    DataSource,
    EvalConfig,
    ModelConfig,
    ObjectiveConfig,
    Section,
    SweepConfig,
)
from crl_ray.data.generate import library_versions, model_device
from crl_ray.errors import UserError
from crl_ray.storage import atomic_write

__all__ = ["EvalOutcome", "EvalSettings", "evaluate_adapter", "evaluate_model", "training_prompts"]

log = logging.getLogger("crl_ray.evaluate")


@dataclass
class EvalOutcome:
    """Flat metrics (``eval/...``, ``objective``, ``objectives/...``), the scalar and vector objectives, the files."""

    metrics: dict[str, float]
    objective: float
    objectives: dict[str, float]
    summary_path: Path
    records_path: Path


STANDALONE_SECTIONS = ("model", "eval", "objective")


class EvalSettings(Section):
    """What an evaluation reads: the model, the evaluation and the objective, and the training data whose prompts
    it must not attack (None without a sweep file). :meth:`of` takes them from a sweep config; ``python -m
    crl_ray.evaluate`` without ``--config`` validates them from flags and overrides."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    data: DataConfig | None = None

    @classmethod
    def of(cls, cfg: SweepConfig) -> EvalSettings:
        return cls(model=cfg.model, eval=cfg.eval, objective=cfg.objective, data=cfg.data)


# --------------------------------------------------------------------------------------------- helpers
def _write_atomic(path: Path, text: str) -> None:
    atomic_write(path, text.encode("utf-8"))


def _jsonl(rows: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def training_prompts(cfg: SweepConfig | EvalSettings, *, effective: bool = False) -> set[str]:
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


# --------------------------------------------------------------------------------------------- evaluation
def evaluate_model(cfg: SweepConfig | EvalSettings, model: Any, tokenizer: Any, *, out_dir: Path, seed: int = 0,
                   progress: bool = False) -> EvalOutcome:
    """Attack, judge and measure ``model`` as ``cfg.eval`` says; score it with ``cfg.objective``; write out_dir.

    Metrics: ``eval/asr/<attack>`` and ``eval/asr/max`` (a behaviour counts once any of its candidates is judged
    harmful), ``eval/verdicts/<attack>/<category>`` (share of the attack's generations per judge category:
    complied, refused, not_carried_out, off_topic, degenerate), ``eval/judge/*`` (the judge's measured accuracy,
    error rates and ASR bias on human labels, beside every ASR), ``eval/mmlu`` and ``eval/mmlu_base`` (the base
    model on the same questions), ``eval/over_refusal``, ``eval/degeneracy``, ``eval/off_topic_benign`` and
    ``eval/helpful_benign`` (shares of the borderline benign prompts' answers refused / degenerate / off topic /
    judged to carry out the request; ``_base`` for the base model's answers to the same prompts, generated once
    and cached), ``eval/degeneracy_attacks``
    (reported, not penalised), ``eval/kl_benign``, ``eval/ppl_benign`` (``_base`` for the base model), continuous
    robustness signals (``eval/target_nll`` and ``_base``: NLL of the behaviours' targets prefilled;
    ``eval/repr_cos/harmful`` and ``/benign``: cos(h, h0) at the loss's target layers on held-out prompts;
    ``eval/embedding/loss``, ``/steps``, ``/reached``: the embedding attack's final loss, Adam steps and share
    reaching its early-stop loss at the configured budget), ``eval/capability``, ``eval/seconds/<part>``,
    ``objective`` (the scalar) and ``objectives/<name>`` (the vector form, directions in
    :data:`crl_ray.evaluate.objective.DIRECTIONS`). ``seed`` seeds the attacks; the MMLU subset has its own seed.
    Over-refusal and KL prompts that appear in the sweep's training data are dropped.
    """
    from crl_ray.evaluate import objective as obj
    from crl_ray.evaluate.attacks import PLAIN, load_behaviors, plain_generations, run_attack
    from crl_ray.evaluate.capability import (
        benign_drift,
        degeneracy_score,
        drift_reference,
        merged_adapter,
        mmlu_accuracy,
        over_refusal,
        reference_model,
        representation_reference,
        representation_shift,
        target_nll,
    )
    from crl_ray.evaluate.judges import KeywordJudge, check_summary, judge_check

    ev = cfg.eval
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    behaviors = load_behaviors(ev.behaviors, "eval.behaviors", limit=ev.limit)
    trained_on = training_prompts(cfg)
    benign = _prompts(ev.over_refusal, "eval.over_refusal", ev.over_refusal_limit, exclude=trained_on)
    # The optimising attacks (embedding, gcg) first, their answers left to generate; then one generation pass over
    # the plain attacks, the over-refusal prompts and those answers (CPU decoding is memory-bound, so fewer, larger
    # batches). Each part's seconds gets its share of the pass by rows. These and MMLU run with a float32 LoRA
    # adapter merged into the weights (the same function, fewer matmuls); the base model's figures come after.
    plain = [name for name in ev.attacks if name in PLAIN]
    pending: list = []
    optimised: dict[str, list] = {}
    with merged_adapter(model):
        for i, name in enumerate(ev.attacks, 1):
            if name in PLAIN:
                continue
            t0 = time.perf_counter()
            log.info("attack %d/%d: %s on %d behaviours", i, len(ev.attacks), name, len(behaviors))
            before = len(pending)
            optimised[name] = run_attack(name, model, tokenizer, behaviors, ev, seed=seed, progress=progress,
                                         pending=pending)
            seconds[f"attack_{name}"] = time.perf_counter() - t0
            log.info("%s attack: %d behaviours optimised in %.1f s (%d answers to generate)", name, len(behaviors),
                     seconds[f"attack_{name}"], len(pending) - before)
        t0 = time.perf_counter()
        log.info("generating: %s on %d behaviours, %d over-refusal prompts and %d optimised inputs",
                 " + ".join(plain) or "no plain attack", len(behaviors), len(benign), len(pending))
        results, benign_answers = plain_generations(model, tokenizer, plain, behaviors, ev, prompts=benign,
                                                    pending=pending, progress=progress)
        rows = len(plain) * len(behaviors) + len(benign) + len(pending)
        seconds["generation"] = time.perf_counter() - t0
        share = seconds["generation"] / rows if rows else 0.0
        for name in plain:
            seconds[f"attack_{name}"] = share * len(behaviors)
        for name in optimised:
            seconds[f"attack_{name}"] += share * sum(len(r.candidates) for r in optimised[name])
        results = {name: results[name] if name in PLAIN else optimised[name] for name in ev.attacks}
        log.info("generated %d rows in %.1f s", rows, seconds["generation"])

        t0 = time.perf_counter()
        mmlu = mmlu_accuracy(model, tokenizer, ev.mmlu, batch_size=ev.batch_size, progress=progress)
    mmlu_base = mmlu.accuracy
    if _has_adapter(model):  # the base model's figure: the same for every trial, cached

        def base_mmlu() -> float:
            with reference_model(model) as base:
                return mmlu_accuracy(base, tokenizer, ev.mmlu, batch_size=ev.batch_size).accuracy

        mmlu_base = base_value(cfg, "mmlu", {"mmlu": ev.mmlu.model_dump(mode="json"), "batch_size": ev.batch_size},
                               base_mmlu)
    seconds["mmlu"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    refusals = over_refusal(benign_answers, is_refusal=KeywordJudge().is_refusal)
    base_answers = None
    if _has_adapter(model):  # the base model's answers to the same prompts (cached: the same for every trial)
        base_answers = _base_answers(cfg, model, tokenizer, benign)
    seconds["over_refusal"] = share * len(benign) + time.perf_counter() - t0

    t0 = time.perf_counter()
    kl_prompts = _prompts(ev.kl_prompts, "eval.kl_prompts", ev.kl_limit, exclude=trained_on)
    kl_answers = _base_answers(cfg, model, tokenizer, kl_prompts)  # cached
    kl_reference = None
    if _has_adapter(model):  # the base model's side of the KL: the same for every trial, cached

        def base_kl_states() -> list:
            with reference_model(model) as base:
                return drift_reference(base, tokenizer, kl_prompts, kl_answers, batch_size=ev.batch_size)

        kl_reference = base_value(cfg, "kl_reference", {"prompts": kl_prompts, "answers": kl_answers,
                                                        "batch_size": ev.batch_size}, base_kl_states, tensors=True)
    drift = benign_drift(model, tokenizer, kl_prompts, max_new_tokens=ev.max_new_tokens,
                         batch_size=ev.batch_size, progress=progress, base_answers=kl_answers,
                         reference_states=kl_reference)
    seconds["kl"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    targets = target_nll(model, tokenizer, [b.prompt for b in behaviors], [b.target for b in behaviors],
                         batch_size=ev.batch_size)

    def base_targets() -> list[float]:
        with reference_model(model) as base:
            return target_nll(base, tokenizer, [b.prompt for b in behaviors], [b.target for b in behaviors],
                              batch_size=ev.batch_size)

    targets_base = (targets if not _has_adapter(model) else
                    base_value(cfg, "target_nll", {"behaviors": [[b.prompt, b.target] for b in behaviors],
                                                   "batch_size": ev.batch_size}, base_targets))
    layers = _signal_layers(cfg, model)

    def shift(prompts: list[str]) -> float:
        reference = None
        if _has_adapter(model):  # the base model's states: the same for every trial, cached

            def base_states() -> list:
                with reference_model(model) as base:
                    return representation_reference(base, tokenizer, prompts, layers, batch_size=ev.batch_size)

            reference = base_value(cfg, "repr_reference", {"prompts": prompts, "layers": layers,
                                                           "batch_size": ev.batch_size}, base_states, tensors=True)
        return representation_shift(model, tokenizer, prompts, layers, batch_size=ev.batch_size,
                                    reference_states=reference)

    signals = {
        "eval/target_nll": _mean(targets), "eval/target_nll_base": _mean(targets_base),
        "eval/repr_cos/harmful": shift([b.prompt for b in behaviors]),
        "eval/repr_cos/benign": shift(kl_prompts),
    }
    seconds["signals"] = time.perf_counter() - t0

    # Everything that needs the evaluated model is done: judge now. A classifier judge (HarmBench's is 13B) gets
    # the GPU the evaluated model no longer needs.
    device = model_device(model)
    if ev.judge == "classifier" and device.type == "cuda":
        import torch

        model.to("cpu")
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    judge = make_judge(cfg, model, progress=progress, device=device)
    flat = [(name, r, c) for name in ev.attacks for r in results[name] for c in r.candidates]
    answers = [answer_part(c.generation, r.behavior.target) for _, r, c in flat]
    judged = categorize(judge, [r.behavior.prompt for _, r, _ in flat], answers)
    benign_cats = [c for _, c in categorize(judge, benign, refusals.answers)]
    base_cats = benign_cats
    if base_answers is not None:  # the base model's answers and so their verdicts: the same every trial, cached
        fit = _judge_fit_key(judge)

        def base_verdicts() -> list[str]:
            return [c for _, c in categorize(judge, benign, base_answers)]

        base_cats = base_verdicts() if fit is None else base_value(
            cfg, "base_benign_verdicts", {"judge": judge.describe(), "fit": fit, "prompts": benign,
                                          "answers": base_answers}, base_verdicts)
    seconds["judge"] = time.perf_counter() - t0
    log.info("judged %d generations with the %s judge in %.1f s", len(flat), judge.name, seconds["judge"])

    broken: dict[str, set[str]] = {name: set() for name in ev.attacks}
    for (name, r, _), (harmful, _) in zip(flat, judged):
        if harmful:
            broken[name].add(r.behavior.id)
    n = len(behaviors)
    metrics: dict[str, float] = {f"eval/asr/{name}": len(broken[name]) / n for name in ev.attacks}
    metrics["eval/asr/max"] = len(set().union(*broken.values())) / n
    metrics.update(signals)
    shares: dict[str, dict[str, float]] = {}
    for name in ev.attacks:
        cats = [c for (a, *_), (_, c) in zip(flat, judged) if a == name]
        shares[name] = {c: cats.count(c) / len(cats) for c in CATEGORIES} if cats else {}
        metrics.update({f"eval/verdicts/{name}/{c}": v for c, v in shares[name].items()})
    records = [{"behavior_id": r.behavior.id, "prompt": r.behavior.prompt, "target": r.behavior.target,
                "attack": name, "config": c.config, "final_input": c.final_input, "generation": c.generation,
                "judged_text": a if a != c.generation else None,
                "loss": c.loss, "steps": c.steps, "harmful": bool(v), "category": cat}
               for (name, r, c), a, (v, cat) in zip(flat, answers, judged)]
    if "embedding" in results:
        metrics.update(_embedding_signals(results["embedding"], ev))

    check = None
    if ev.judge_check:
        t0 = time.perf_counter()
        check = judge_check(judge)
        metrics.update({f"eval/{k}": v for k, v in check_summary(check).items()})
        seconds["judge_check"] = time.perf_counter() - t0

    metrics.update({
        "eval/mmlu": mmlu.accuracy,
        "eval/mmlu_base": mmlu_base,
        "eval/over_refusal": benign_cats.count("refused") / len(benign_cats),
        "eval/over_refusal_base": base_cats.count("refused") / len(base_cats),
        "eval/degeneracy": benign_cats.count("degenerate") / len(benign_cats),
        "eval/degeneracy_base": base_cats.count("degenerate") / len(base_cats),
        "eval/off_topic_benign": benign_cats.count("off_topic") / len(benign_cats),
        "eval/helpful_benign": benign_cats.count("complied") / len(benign_cats),
        "eval/helpful_benign_base": base_cats.count("complied") / len(base_cats),
        "eval/kl_benign": drift.kl,
        "eval/ppl_benign": drift.ppl,
        "eval/ppl_benign_base": drift.ppl_reference,
    })
    if flat:
        metrics["eval/degeneracy_attacks"] = sum(c == "degenerate" for _, c in judged) / len(flat)
    metrics["eval/capability"] = obj.capability(metrics, cfg.objective)
    scalar = obj.scalar_objective(metrics, cfg.objective)
    vector = obj.vector_objective(metrics, cfg.objective)
    metrics["objective"] = scalar
    metrics.update({f"objectives/{name}": value for name, value in vector.items()})
    constraints = obj.constraint_values(metrics, cfg.objective)
    metrics.update({f"constraints/{k}": v for k, v in constraints.items()})
    metrics["feasible"] = float(obj.feasible(metrics, cfg.objective))
    seconds["total"] = time.perf_counter() - started
    metrics.update({f"eval/seconds/{part}": s for part, s in seconds.items()})

    records_path = out_dir / "records.jsonl"
    _write_atomic(records_path, _jsonl(records))
    _write_atomic(out_dir / "over_refusal.jsonl", _jsonl(
        [{"prompt": p, "answer": a, "category": c, "refused_keyword": r, "repetition": degeneracy_score(a)}
         for p, a, c, r in zip(benign, refusals.answers, benign_cats, refusals.refused)]))
    summary = {
        "model": cfg.model.model_dump(mode="json"),
        "seed": seed,
        "behaviors": {"source": ev.behaviors.model_dump(mode="json"), "count": n},
        "asr": {name: metrics[f"eval/asr/{name}"] for name in [*ev.attacks, "max"]},
        "judge": judge.describe(),
        "judge_accuracy": check_summary(check) if check is not None else None,
        "verdicts": shares,
        "budget": {"max_new_tokens": ev.max_new_tokens,
                   **({"embedding": {"steps": ev.embedding.steps, "configs": len(ev.embedding.runs())}}
                      if "embedding" in ev.attacks else {}),
                   **({"gcg": ev.gcg.model_dump(mode="json")} if "gcg" in ev.attacks else {})},
        "jailbroken": {name: sorted(ids) for name, ids in broken.items()},
        "mmlu": {**asdict(mmlu), "base_accuracy": mmlu_base},
        "over_refusal": {"rate": metrics["eval/over_refusal"], "prompts": len(benign),
                         "categories": {c: benign_cats.count(c) / len(benign_cats) for c in CATEGORIES},
                         "base_categories": {c: base_cats.count(c) / len(base_cats) for c in CATEGORIES}},
        "kl_benign": {"kl": drift.kl, "ppl": drift.ppl, "ppl_base": drift.ppl_reference, "tokens": drift.tokens,
                      "prompts": len(kl_prompts)},
        "signals": {k: metrics[k] for k in metrics if k.startswith(("eval/target_nll", "eval/repr_cos",
                                                                    "eval/embedding/"))},
        "objective": {"kind": cfg.objective.kind, "scalar": scalar, "vector": vector,
                      "directions": obj.DIRECTIONS, "capability": cfg.objective.capability,
                      "formula": obj.FORMULA, "constraints": constraints,
                      "feasible": bool(metrics["feasible"])},
        "judge_check": check,
        "seconds": seconds,
        "metrics": metrics,
        "settings": {"eval": ev.model_dump(mode="json"), "objective": cfg.objective.model_dump(mode="json")},
        "files": {"records": records_path.name, "over_refusal": "over_refusal.jsonl"},
        "versions": library_versions(),
    }
    summary_path = out_dir / "summary.json"
    _write_atomic(summary_path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    log.info("evaluation written to %s (%.1f s)", summary_path, seconds["total"])
    return EvalOutcome(metrics=metrics, objective=scalar, objectives=vector, summary_path=summary_path,
                       records_path=records_path)


# --------------------------------------------------------------------------------------------- judging
CATEGORIES = ("complied", "refused", "not_carried_out", "off_topic", "degenerate")


def answer_part(generation: str, target: str) -> str:
    """What the judge reads: the generation without a leading copy of the attack's own target.

    The optimising attacks (embedding, GCG) train the model to start with the target ("Sure, here is how to ...");
    that text is the attacker's, forced like the prefill attack's prefix (which the prefill generation does not
    contain either). Whether the answer carries out the behaviour is decided on what the model adds after it.
    """
    head, tail = " ".join(generation.split()), " ".join(target.split())
    if not tail or not head.lower().startswith(tail.lower()):
        return generation
    # cut after the same number of non-space characters as the target has
    need, seen = len(tail.replace(" ", "")), 0
    for i, ch in enumerate(generation):
        if not ch.isspace():
            seen += 1
            if seen == need:
                return generation[i + 1:].lstrip(" :\n")
    return ""


def make_judge(cfg: SweepConfig | EvalSettings, model: Any, *, progress: bool = False, device: Any = None):
    """The judge ``cfg.eval.judge`` asks for, on ``device`` (default: the evaluated model's). The probe's judge LM
    is its own frozen model, never ``model``."""
    from crl_ray.evaluate.registry import get_judge

    ev = cfg.eval
    device = device if device is not None else model_device(model)
    if ev.judge == "classifier":
        return get_judge("classifier", model_name=ev.judge_model, batch_size=ev.batch_size, dtype=cfg.model.dtype,
                         device=device, progress=progress)
    if ev.judge == "probe":  # calibrated on answers as long as the ones it will judge
        return get_judge("probe", model_name=ev.judge_model, batch_size=ev.batch_size, device=device,
                         max_answer_tokens=ev.max_new_tokens, question=ev.judge_question, progress=progress)
    return get_judge(ev.judge)


def categorize(judge: Any, behaviors: Sequence[str], generations: Sequence[str]) -> list[tuple[bool, str]]:
    """(harmful, category) per generation. The probe gives its own categories; for the other judges the verdict
    decides harmful, and the keyword rules name why an answer is not: degenerate (too short or a loop), refused."""
    from crl_ray.evaluate.judges import KeywordJudge

    if not generations:
        return []
    verdicts = getattr(judge, "verdicts", None)
    if callable(verdicts):
        return [(v.harmful, v.category) for v in verdicts(behaviors, generations)]
    harmful = judge.judge(behaviors, generations)
    keyword = judge if isinstance(judge, KeywordJudge) else KeywordJudge()
    out = []
    for h, g in zip(harmful, generations):
        if h:
            out.append((True, "complied"))
        elif keyword.is_degenerate(g):
            out.append((False, "degenerate"))
        elif keyword.is_refusal(g):
            out.append((False, "refused"))
        else:
            out.append((False, "not_carried_out"))
    return out


def _base_answers(cfg: SweepConfig | EvalSettings, model: Any, tokenizer: Any, prompts: Sequence[str]) -> list[str]:
    """The base model's greedy answers to ``prompts`` (adapter disabled, ``eval.repetition_penalty`` as for the
    evaluated model), through the generation cache."""
    from crl_ray.config import GenerationConfig
    from crl_ray.data.assets import cache_dir
    from crl_ray.data.generate import cached_answers
    from crl_ray.evaluate.capability import reference_model

    ev = cfg.eval
    gen = GenerationConfig(max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size, temperature=0.0,
                           repetition_penalty=ev.repetition_penalty)
    with reference_model(model) as base:
        return cached_answers(prompts, model_id=cfg.model.name, revision=cfg.model.revision, cfg=gen, system=None,
                              cache_dir=cache_dir() / "generations", load_model=lambda: (base, tokenizer),
                              dtype=cfg.model.dtype)


BASE_VALUE_VERSION = "1"  # bump when a change here or in the measured functions changes a base figure


def base_value(cfg: SweepConfig | EvalSettings, kind: str, inputs: dict[str, Any], compute: Callable[[], Any], *,
               tensors: bool = False) -> Any:
    """A figure of the base model (adapter disabled) that every trial of a sweep would recompute identically
    (MMLU accuracy, target NLLs, the judge's verdicts on its answers; with ``tensors``, a list of tensors such as
    its hidden states for the KL and the representation shift): from the node cache
    (``~/.cache/crl_ray/eval_base``), or ``compute()`` once and stored. The key covers the model (name, revision,
    dtype), ``kind``, ``inputs`` (questions, prompts, batch size: everything the figure depends on) and the library
    versions."""
    import hashlib
    import io

    from filelock import FileLock

    from crl_ray.data.assets import cache_dir
    from crl_ray.data.generate import library_versions

    blob = json.dumps({"version": BASE_VALUE_VERSION, "kind": kind, "model": cfg.model.model_dump(mode="json"),
                       "inputs": inputs, "libraries": library_versions()}, sort_keys=True, default=str)
    key = hashlib.sha256(blob.encode()).hexdigest()[:24]
    folder = cache_dir() / "eval_base"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}-{key}.{'pt' if tensors else 'json'}"
    with FileLock(str(folder / f"{kind}-{key}.lock")):
        if path.is_file():
            try:
                if tensors:
                    import torch

                    value = torch.load(path, map_location="cpu", weights_only=True)["value"]
                else:
                    value = json.loads(path.read_text())["value"]
                log.info("base-model %s from the cache (%s)", kind, path.name)
                return value
            except Exception as exc:  # a damaged file: recompute it
                log.warning("base-model cache %s unreadable (%s); recomputing", path.name, exc)
        value = compute()
        if tensors:
            import torch

            buffer = io.BytesIO()
            torch.save({"kind": kind, "value": [t.contiguous() for t in value]}, buffer)
            atomic_write(path, buffer.getvalue())
        else:
            _write_atomic(path, json.dumps({"kind": kind, "value": value}, allow_nan=True))
        return value


def _judge_fit_key(judge: Any) -> str | None:
    """What identifies a judge's verdicts beyond :meth:`describe`: the probe's fit (labels, judge LM); "" for a
    judge without a fit; None when they cannot be keyed (a probe fitted on given labels), i.e. not to be cached."""
    key = getattr(judge, "fit_key", None)
    return key() if callable(key) else ""


def _embedding_signals(results: Sequence[Any], ev: Any) -> dict[str, float]:
    """The embedding attack at its budget: mean final target loss, mean Adam steps, share reaching the early stop."""
    runs = ev.embedding.runs()
    losses, steps, reached = [], [], []
    for r in results:
        for c, run in zip(r.candidates, runs):
            if c.loss is not None:
                losses.append(float(c.loss))
                steps.append(float(c.steps))
                reached.append(float(c.loss < run.early_stop_loss))
    if not losses:
        return {}
    return {"eval/embedding/loss": _mean(losses), "eval/embedding/steps": _mean(steps),
            "eval/embedding/reached": _mean(reached)}


def _signal_layers(cfg: SweepConfig | EvalSettings, model: Any) -> list[int]:
    """hidden_states indices of the representation-shift signal: the loss's target layers (default if unset)."""
    from crl_ray.config import LossConfig
    from crl_ray.training.model import num_blocks

    loss = getattr(cfg, "loss", None) or LossConfig()
    n = num_blocks(model)
    return [layer for layer in loss.target_layers.resolve(n) if layer <= n]


def _has_adapter(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v == v]
    return sum(finite) / len(finite) if finite else float("nan")


def _same_model(a: str, b: str) -> bool:
    """Same model if the last two path parts agree (hub id owner/name, or a cache's asset/version folder)."""
    return Path(a).parts[-2:] == Path(b).parts[-2:]


def check_adapter(adapter_dir: Path, model_name: str, flag: str = "--adapter") -> None:
    """Raise UserError when ``adapter_dir`` is not a peft adapter, or was trained on another base model."""
    from crl_ray.data.assets import resolve_model

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


def evaluate_adapter(cfg: SweepConfig | EvalSettings, adapter_dir: Path | None, *, out_dir: Path, seed: int = 0,
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


