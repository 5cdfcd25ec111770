"""``python -m crl_ray.bench attack``: the project's embedding attack vs a literal naive port, on the same work.

Both attack the same HarmBench validation behaviours (standard, first N) with the same soft-prompt init, Adam
learning rate, step budget and seed, then generate greedily. The naive port takes one behaviour at a time and
each step runs the full chat (prefix + soft prompt + end of turn + target) through the model with logits at every
position and ``loss.backward()`` (weight gradients included, as the paper's code does), for exactly ``--steps``
steps; it keeps the loss of every step. The project's attack (:func:`crl_ray.evaluate.attacks.run_attack`) batches
behaviours, reuses the prefix keys/values, computes logits at target positions only, takes gradients w.r.t. the
soft prompt only, and stops a behaviour once its loss is below the early-stop threshold; ``--precision bf16`` runs
its optimisation passes under bfloat16 autocast with fp32 verdicts (``eval.embedding.precision``).

Outcome of a behaviour: SUCCESS if its target cross-entropy fell below ``early_stop_loss`` within the budget,
checked before every Adam step and after the last; its STOP STEP is the first such step. The naive run never stops,
so it sees the same check at every step. The outcomes agree when both find the same successes (``outcomes_agree``);
``stop_step_agree`` / ``stop_step_max_diff`` say whether they also got there at the same step: float32 sums in
another order (batched rows, cached prefix, fewer logits) drift the losses by ~1e-3 over ~80 Adam steps, which can
move a crossing of the threshold by a step or two.
Generations are reported but not part of the outcome: the naive run keeps optimising after its stop step, so its
soft prompt (and possibly its text) differs; ``emits_target`` says whether each generation begins with the target.

Prints one JSON object (and writes it to ``--out``); ``generation_seconds`` is the part of each side's time spent
in greedy generation, the rest is optimisation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ValidationError

from crl_ray.config import (
    EMBEDDED_DEFAULT_MODEL,
    DataSource,
    EmbeddingAttackConfig,
    EvalConfig,
)
from crl_ray.errors import USAGE_EXIT_CODE, UserError
from crl_ray.evaluate import attacks
from crl_ray.evaluate.attacks import (
    Behavior,
    attack_layout,
    greedy_generate,
    init_ids,
    load_behaviors,
    run_attack,
)

logger = logging.getLogger(__name__)


def naive_embedding_attack(model: Any, tokenizer: Any, behaviors: list[Behavior], *, lr: float, init: str,
                           soft_prompt_tokens: int | None, steps: int, max_new_tokens: int) -> list[dict[str, Any]]:
    """The literal port: per behaviour, ``steps`` full-sequence Adam steps (no cache, no early stop), then greedy.

    Returns per behaviour ``losses`` (the loss before each step, then after the last), ``generation`` and
    ``generation_seconds``.
    """
    embed = model.get_input_embeddings()
    out = []
    for b in behaviors:
        lay = attack_layout(tokenizer, b)
        before, after, target = (embed(torch.tensor(ids)).detach() for ids in
                                 (lay.before_ids, lay.after_ids, lay.target_ids))
        labels = torch.tensor(lay.target_ids)
        soft = embed(torch.tensor(init_ids(tokenizer, init, soft_prompt_tokens))).detach().clone().requires_grad_()
        optimizer = torch.optim.Adam([soft], lr=lr)
        losses = []
        for step in range(steps + 1):
            with torch.set_grad_enabled(step < steps):
                logits = model(inputs_embeds=torch.cat([before, soft, after, target])[None]).logits[0]
                loss = F.cross_entropy(logits[-len(labels) - 1:-1].float(), labels)
            losses.append(loss.item())
            if step < steps:
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.zero_grad(set_to_none=True)  # the weight gradients the literal port accumulates
        started = time.perf_counter()
        text = greedy_generate(model, tokenizer, [torch.cat([before, soft.detach(), after])],
                               max_new_tokens=max_new_tokens, batch_size=1)[0]
        out.append({"losses": losses, "generation": text, "generation_seconds": time.perf_counter() - started})
    return out


@contextlib.contextmanager
def _timed_generation() -> Iterator[list[float]]:
    """Seconds the project's attack spends in :func:`crl_ray.evaluate.attacks.greedy_generate` (the rest is optimisation).

    Wraps the module attribute for the duration of the block; the value is in the yielded list's only item.
    """
    total = [0.0]
    original = attacks.greedy_generate

    def timed(*args: Any, **kwargs: Any) -> list[str]:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - started

    attacks.greedy_generate = timed
    try:
        yield total
    finally:
        attacks.greedy_generate = original


def _emits(target: str, generation: str) -> bool:
    return generation.lstrip().startswith(target.strip())


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run both attacks on the same behaviours and compare speed and outcomes."""
    from crl_ray.data import load_model_and_tokenizer

    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.eval()
    behaviors = load_behaviors(DataSource(source="harmbench_val", where={"FunctionalCategory": "standard"}),
                               "bench.behaviors", limit=args.behaviors)
    ecfg = EmbeddingAttackConfig(steps=args.steps, lr=args.lr, early_stop_loss=args.early_stop_loss,
                                 soft_prompt_tokens=args.soft_prompt_tokens, batch_size=args.batch_size,
                                 precision=args.precision)
    cfg = EvalConfig(max_new_tokens=args.max_new_tokens, attacks=["embedding"], embedding=ecfg)
    threshold = ecfg.early_stop_loss

    with torch.no_grad():  # warm-up, so neither timed run pays for first-call allocations
        model(input_ids=torch.tensor([attack_layout(tokenizer, behaviors[0]).before_ids]))

    started = time.perf_counter()
    naive = naive_embedding_attack(model, tokenizer, behaviors, lr=ecfg.lr, init=ecfg.init,
                                   soft_prompt_tokens=ecfg.soft_prompt_tokens, steps=ecfg.steps,
                                   max_new_tokens=cfg.max_new_tokens)
    naive_s = time.perf_counter() - started
    started = time.perf_counter()
    with _timed_generation() as project_gen:
        project = run_attack("embedding", model, tokenizer, behaviors, cfg, seed=args.seed)
    project_s = time.perf_counter() - started
    naive_gen = sum(nv["generation_seconds"] for nv in naive)

    rows = []
    for b, nv, pr in zip(behaviors, naive, project):
        cand = pr.candidates[0]
        first = next((t for t, v in enumerate(nv["losses"]) if v < threshold), None)
        success = cand.loss is not None and cand.loss < threshold
        rows.append({
            "id": b.id,
            "naive_success": first is not None,
            "project_success": success,
            "naive_stop_step": first,
            "project_stop_step": cand.steps if success else None,
            "project_loss": cand.loss,
            "naive_loss_at_project_step": nv["losses"][cand.steps],
            "naive_final_loss": nv["losses"][-1],
            "naive_emits_target": _emits(b.target, nv["generation"]),
            "project_emits_target": _emits(b.target, cand.generation),
        })
    success_agree = all(r["naive_success"] == r["project_success"] for r in rows)
    steps_agree = all(r["naive_stop_step"] == r["project_stop_step"] for r in rows)
    step_diffs = [abs(r["naive_stop_step"] - r["project_stop_step"]) for r in rows
                  if r["naive_stop_step"] is not None and r["project_stop_step"] is not None]
    n = len(behaviors)
    return {
        "benchmark": "attack",
        "model": args.model,
        "threads": torch.get_num_threads(),
        "behaviors": n,
        "steps": ecfg.steps,
        "seed": args.seed,
        "lr": ecfg.lr,
        "early_stop_loss": threshold,
        "soft_prompt_tokens": ecfg.soft_prompt_tokens,
        "batch_size": ecfg.batch_size,
        "precision": ecfg.precision,
        "max_new_tokens": cfg.max_new_tokens,
        "naive": {"seconds": naive_s, "behaviors_per_s": n / naive_s, "generation_seconds": naive_gen,
                  "adam_steps": n * ecfg.steps, "successes": sum(r["naive_success"] for r in rows)},
        "project": {"seconds": project_s, "behaviors_per_s": n / project_s, "generation_seconds": project_gen[0],
                    "adam_steps": sum(c.steps for r in project for c in r.candidates),
                    "successes": sum(r["project_success"] for r in rows)},
        "speedup": naive_s / project_s,
        "outcome": f"success = target cross-entropy < {threshold} within {ecfg.steps} steps (checked before each "
                   "step and after the last); stop step = the first step where it holds",
        "outcomes_agree": success_agree,
        "success_agree": success_agree,
        "stop_step_agree": steps_agree,
        "stop_step_max_diff": max(step_diffs, default=0),
        "max_abs_loss_diff": max(abs(r["project_loss"] - r["naive_loss_at_project_step"]) for r in rows),
        "emits_target_agree": all(r["naive_emits_target"] == r["project_emits_target"] for r in rows),
        "per_behavior": rows,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m crl_ray.bench attack [--behaviors N] [--steps S] [--seed N] [--model M] [--out FILE]``"""
    default = EmbeddingAttackConfig()
    parser = argparse.ArgumentParser(prog="python -m crl_ray.bench attack", description=__doc__.splitlines()[0])
    parser.add_argument("--behaviors", type=int, default=8, help="first N HarmBench val standard behaviours")
    parser.add_argument("--steps", type=int, default=default.steps, help="Adam step budget per behaviour")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=EMBEDDED_DEFAULT_MODEL, help="HF id, local folder or embedded: name")
    parser.add_argument("--lr", type=float, default=default.lr)
    parser.add_argument("--early-stop-loss", type=float, default=default.early_stop_loss)
    parser.add_argument("--soft-prompt-tokens", type=int, default=default.soft_prompt_tokens)
    parser.add_argument("--batch-size", type=int, default=default.batch_size, help="the project's batch size")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=default.precision,
                        help="the project's optimisation passes (the naive port stays fp32; verdicts are fp32)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = run(args)
    except (UserError, ValidationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_EXIT_CODE
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
