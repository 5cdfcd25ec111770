"""``python -m crl_ray.bench step``: the project's CRL training step vs a literal port of the reference step.

The naive step follows the reference code: for each of the benign, harmful and retain batches, one frozen pass
(adapter disabled) and one LoRA pass, each through every block and the LM head with ``output_hidden_states``;
then the same loss functions. The project's step is :class:`crl_ray.training.step.StepComputer` with the training job's
settings (``train.unpad``, ``train.activation_checkpointing``: packed rows and selective checkpointing by default
on CPU; ``--unpad`` and ``--activation-checkpointing`` change them; the JSON says which). Both run on the same
model, LoRA initialisation, batches and seed, each in a fresh subprocess (peak RSS is per process), and the
benchmark prints one JSON object: seconds per step, tokens/s, peak memory, loss values, and the ratios.

``--dense`` fills every row (no padding), so both variants do the same real-token work and the comparison shows what
the project's step saves beyond skipping padding. ``--shape smoke`` benchmarks the smoke sweep's shape (micro-batch
2, requests <= 64 and responses <= 48 tokens, LoRA r 8, its loss layers, 2 threads) instead of the default 4 x 256;
a flag given wins over the shape (``--shape smoke --batch 4``: smoke.yaml's one-worker micro-batch).
``--lora-dropout`` sets both variants' LoRA dropout (default 0; the paper's 0.05 costs ~35 % of a CPU step, so
smoke.yaml runs 0). ``--precision bf16`` runs the project's step under CPU/GPU bf16 autocast (fp32 weights and
gradients, bf16 matmuls); the naive step always stays the literal fp32 port. ``--frozen-cache`` gives the project's
step ``train.frozen_cache`` (the frozen outputs of the benchmark's rows computed once, before the timed steps; that
one-off cost is reported apart). The project's JSON also says how much of its step the frozen passes take
(``frozen_share``: the most a frozen-output cache can save) and, with ``--profile``, its top operators.

Targets (issue 3): on SmolLM2-135M at batch 4 x 256 tokens on 2 CPU cores, >= 1.5x the naive tokens/s and
<= 0.5x its peak memory, with the same loss (relative 1e-4). Issue 13: the same on dense rows at >= 2x and <= 0.4x;
the smoke shape at >= 0.8x the dense large-batch tokens/s.
"""

from __future__ import annotations

import argparse
from argparse import SUPPRESS
import json
import resource
import subprocess
import sys
import time
from typing import Any

import torch

from crl_ray.training.reference import naive_step, synthetic_batch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m crl_ray.bench step", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="embedded:smollm2-135m-instruct", help="HF id, folder or embedded: name")
    p.add_argument("--batch", type=int, default=SUPPRESS,
                   help=_shape_help("batch", "rows per batch kind (benign, harmful, retain)"))
    p.add_argument("--seq", type=int, default=SUPPRESS,
                   help=_shape_help("seq", "tokens per row (half request, half response)"))
    p.add_argument("--dense", action="store_true", help="every row full length (no padding): identical work")
    p.add_argument("--shape", default=None, choices=["smoke"],
                   help="smoke: the smoke sweep's micro-batch 2, 64 + 48 tokens, LoRA r 8, its layers, 2 threads "
                   "(the defaults of --batch, --seq, --lora-r, --lora-dropout, --loss, --threads; a flag given "
                   "wins, e.g. --batch 4 = smoke.yaml's one-worker micro-batch)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="project step: fp32, or bf16 autocast (fp32 master weights)")
    p.add_argument("--steps", type=int, default=2, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--lora-r", type=int, default=SUPPRESS, help=_shape_help("lora_r", "LoRA rank"))
    p.add_argument("--lora-dropout", type=float, default=SUPPRESS,
                   help=_shape_help("lora_dropout", "lora.dropout of both variants (paper 0.05; smoke.yaml 0). "
                                    "Above 0 the two variants draw different masks, so their losses are not compared"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss", default=SUPPRESS, choices=["paper", "script", "smoke"],
                   help=_shape_help("loss", "paper: mix distances, margins 500/1500, benign layers all; script: "
                                    "released train.sh; smoke: sweeps/smoke.yaml's loss (target layers 19..28, "
                                    "benign layers = target)"))
    p.add_argument("--variant", default="both", choices=["both", "project", "naive"],
                   help="both = run each in its own subprocess and compare")
    p.add_argument("--threads", type=int, default=SUPPRESS,
                   help=_shape_help("threads", "torch threads (None: torch's choice)"))
    p.add_argument("--activation-checkpointing", default=None, choices=["selective", "full", "off"],
                   help="project step: train.activation_checkpointing (default: the config default)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="project step: train.activation_checkpointing_every (default: the config default)")
    p.add_argument("--unpad", default="auto", choices=["auto", "true", "false"],
                   help="project step: train.unpad (auto = packed rows on CPU)")
    p.add_argument("--frozen-cache", action="store_true",
                   help="project step: train.frozen_cache (h0 and the retain states computed once before the timed "
                   "steps, reported as frozen_cache_build_seconds; the steps run only the LoRA passes)")
    p.add_argument("--profile", action="store_true",
                   help="project step: also torch.profiler's top operators (self CPU time) over the timed steps")
    p.add_argument("--out", default=None, help="also write the JSON here")
    return p


def bench_config(args: argparse.Namespace):
    from crl_ray.config import parse_config

    loss: dict[str, Any] = {"kind": "crl"}
    if args.loss == "script":
        loss.update(alpha=0.5, beta=0.6, gamma=0.7, margin_benign=2.0, margin_harmful=3.0, dist_benign_pos="l2",
                    dist_benign_neg="cosine", dist_harmful_pos="cosine", dist_harmful_neg="cosine")
    elif args.loss == "smoke":
        loss.update(target_layers={"fraction": [0.625, 0.9375]}, benign_layers="target", margin_benign=100.0,
                    margin_harmful=1000.0, alpha=0.5, beta=0.4, gamma=10.0)
    half = request_tokens(args)
    train: dict[str, Any] = {"unpad": {"true": True, "false": False}.get(args.unpad, "auto")}
    if args.activation_checkpointing is not None:
        train["activation_checkpointing"] = args.activation_checkpointing
    if args.checkpoint_every is not None:
        train["activation_checkpointing_every"] = args.checkpoint_every
    return parse_config({
        "name": "bench-step", "model": {"name": args.model}, "train": train,
        "lora": {"r": args.lora_r, "alpha": args.lora_r, "dropout": args.lora_dropout}, "loss": loss,
        "data": {"benign": [{"source": "benign_prompts", "answer": "refusal_template"}],
                 "harmful": [{"source": "advbench", "answer": "refusal_template"}],
                 "retain": [{"source": "benign_prompts", "answer": "refusal_template"}],
                 "max_request_tokens": half, "max_response_tokens": args.seq - half},
        "search": {"algorithm": "none", "num_trials": 1},
    })


BF16_LOSS_TOLERANCE = 1e-2  # relative; bf16 keeps 8 bits of mantissa (~3 significant digits) per matmul
# micro-batch 2: a worker's share of the smoke sweep's 4 rows a step when it runs two workers (smoke.yaml runs one
# 2-core worker at micro-batch 4 since 2026-12-02; the smaller batch is the harder case for the step's efficiency)
SMOKE_SHAPE = {"batch": 2, "seq": 112, "request": 64, "lora_r": 8, "lora_dropout": 0.0, "loss": "smoke",
               "threads": 2}


DEFAULT_SHAPE = {"batch": 4, "seq": 256, "lora_r": 16, "lora_dropout": 0.0, "loss": "paper", "threads": None}


def _shape_help(key: str, text: str) -> str:
    return f"{text} (default: {DEFAULT_SHAPE[key]}; with --shape smoke: {SMOKE_SHAPE[key]})"


def apply_shape(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the shape flags not given: ``--shape smoke``'s sizes (the smoke sweep's micro-batch, row lengths, LoRA
    rank, loss layers and threads), else the default 4 x 256 batch."""
    shape = SMOKE_SHAPE if args.shape == "smoke" else DEFAULT_SHAPE
    for key in DEFAULT_SHAPE:
        if not hasattr(args, key):
            setattr(args, key, shape[key])
    return args


def request_tokens(args: argparse.Namespace) -> int:
    return SMOKE_SHAPE["request"] if args.shape == "smoke" else args.seq // 2


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model, run warm-up + timed steps of one variant in this process, return its numbers."""
    from crl_ray.data import load_model_and_tokenizer
    from crl_ray.training.model import (
        apply_lora,
        cast_frozen_linears,
        enable_activation_checkpointing,
        lora_blocks,
        num_blocks,
        seed_everything,
    )
    from crl_ray.training.step import LossPlan, StepComputer, micro_step

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = bench_config(args)
    model, _ = load_model_and_tokenizer(cfg.model.name)
    n = num_blocks(model)
    plan = LossPlan.from_config(cfg, n)
    seed_everything(args.seed)
    model = apply_lora(model, cfg, lora_blocks(cfg, n, plan.deepest_layer))
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():  # a non-zero adapter, so h != h0 and every loss term is exercised
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    if args.variant != "naive":
        enable_activation_checkpointing(model, cfg.train.activation_checkpointing,
                                        cfg.train.activation_checkpointing_every)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    vocab = model.get_input_embeddings().weight.shape[0]
    half = request_tokens(args)
    batches = [synthetic_batch(vocab, args.batch, half, args.seq - half, gen, dense=args.dense) for _ in range(3)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    frozen_outputs, build_seconds = None, None
    if args.frozen_cache and args.variant != "naive":
        from crl_ray.training.frozen import FrozenSpec, compute_frozen

        start = time.perf_counter()
        frozen_outputs = compute_frozen(model, dict(zip(("benign", "harmful", "retain"), batches)),
                                        FrozenSpec.of(cfg, plan))
        build_seconds = time.perf_counter() - start
        batches = [{**b, "row": torch.arange(args.batch)} for b in batches]
    # naive: plain sdpa model
    computer = None if args.variant == "naive" else StepComputer(cfg, model, plan, frozen=frozen_outputs)
    if computer is not None and args.precision == "bf16":  # as the (unsharded) worker does
        cast_frozen_linears(model, torch.bfloat16)
    frozen = [0.0]  # seconds in the frozen (adapter-disabled) passes: what a cache of their outputs could save
    if computer is not None:
        computer._frozen = _timed(computer._frozen, frozen)
    profiler = None
    rss_before = _peak_rss_gb()
    times, losses, terms = [], [], {}
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            frozen[0] = 0.0
            if args.profile and computer is not None:
                profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                profiler.__enter__()
        start = time.perf_counter()
        if args.variant == "naive":
            loss, terms = naive_step(model, cfg, plan, *batches)
            loss.backward()
        else:
            # the worker's own micro-step (its precision region), one micro-step a step
            loss, metrics = micro_step(computer, model, *batches, precision=args.precision, device_type="cpu",
                                       micro_step=0, optimizer_step=0)
            terms = {k: v for k, v in metrics.items() if k in ("train/loss_b", "train/loss_h", "train/loss_kl")}
        grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in trainable]))
        for p in trainable:  # no optimizer step: every step sees the same weights, so losses repeat exactly
            p.grad = None
        elapsed = time.perf_counter() - start
        if i >= args.warmup:
            times.append(elapsed)
        losses.append(float(loss))
    if profiler is not None:
        profiler.__exit__(None, None, None)
    s_per_step = sum(times) / len(times)
    extra: dict[str, Any] = {}
    if frozen_outputs is not None:
        extra["frozen_cache_build_seconds"] = round(build_seconds, 3)
    if computer is not None:
        extra["frozen_seconds_per_step"] = round(frozen[0] / len(times), 4)
        extra["frozen_share"] = round(frozen[0] / sum(times), 4)
    if profiler is not None:
        extra["profile_top_ops"] = _top_ops(profiler, sum(times))
    return {**extra, "variant": args.variant, "seconds_per_step": round(s_per_step, 4),
            "tokens_per_step": tokens, "tokens_per_s": round(tokens / s_per_step, 2),
            "peak_rss_gb": round(_peak_rss_gb(), 3), "rss_before_steps_gb": round(rss_before, 3),
            "loss": losses[-1], "terms": terms, "grad_norm": grad_norm, "threads": torch.get_num_threads(),
            "lora_dropout": _lora_dropout(model),
            "settings": {} if args.variant == "naive" else {
                "precision": args.precision, "unpad": computer.unpad, "frozen_cache": frozen_outputs is not None,
                "activation_checkpointing": cfg.train.activation_checkpointing,
                "activation_checkpointing_every": cfg.train.activation_checkpointing_every}}


def _lora_dropout(model: Any) -> float:
    """The dropout probability of the model's LoRA layers (what the step really ran with)."""
    ps = {m.p for name, m in model.named_modules() if "lora_dropout" in name and isinstance(m, torch.nn.Dropout)}
    return max(ps, default=0.0)


def _timed(fn, total: list[float]):
    """``fn`` that adds its wall time to ``total[0]``."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - start
    return wrapper


def _top_ops(profiler: Any, wall: float, n: int = 12) -> list[dict[str, Any]]:
    """The ``n`` operators with the most self CPU time over the profiled steps, with their share of the wall time
    (with 2+ threads an operator's CPU time is its wall time: intra-op work is inside the op)."""
    events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [{"op": e.key, "calls": e.count, "self_seconds": round(e.self_cpu_time_total / 1e6, 3),
             "share": round(e.self_cpu_time_total / 1e6 / wall, 3)} for e in events]


def main(argv: list[str] | None = None) -> int:
    args = apply_shape(build_parser().parse_args(argv))
    if args.seq < 4 or args.batch < 1 or args.steps < 1:
        print("error: --seq must be >= 4, --batch and --steps >= 1", file=sys.stderr)
        return 2
    if args.variant != "both":
        return _emit(json.dumps(run_variant(args)), args.out)
    results = {}
    base = _strip_options(list(argv if argv is not None else sys.argv[1:]), ("--variant", "--out"))
    for variant in ("naive", "project"):
        cmd = [sys.executable, "-m", "crl_ray.bench", "step", *base, "--variant", variant]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"error: the {variant} step failed:\n{proc.stderr[-4000:]}", file=sys.stderr)
            return 1
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    naive, project = results["naive"], results["project"]
    rel = abs(project["loss"] - naive["loss"]) / max(abs(naive["loss"]), 1e-12)
    comparable = args.lora_dropout == 0  # dropout masks differ between the variants' passes
    summary = {
        "model": args.model, "batch": args.batch, "seq": args.seq, "lora_r": args.lora_r,
        "lora_dropout": args.lora_dropout, "loss_kind": args.loss,
        "dense": args.dense, "shape": args.shape or "custom", "precision": args.precision,
        "frozen_cache": args.frozen_cache,
        "naive": naive, "project": project,
        "speedup_tokens_per_s": round(project["tokens_per_s"] / naive["tokens_per_s"], 3),
        "peak_memory_ratio": round(project["peak_rss_gb"] / naive["peak_rss_gb"], 3),
        "loss_rel_diff": rel if comparable else None,
        # dense rows: issue 13's bars; bf16: the stated tolerance of a bf16 step against the fp32 oracle
        "targets": {"speedup_min": 2.0 if args.dense else 1.5, "memory_ratio_max": 0.4 if args.dense else 0.5,
                    "loss_rel_max": BF16_LOSS_TOLERANCE if args.precision == "bf16" else 1e-4},
    }
    t = summary["targets"]
    # the targets need the same loss: with dropout masks the two variants' losses cannot be compared
    summary["targets_met"] = None if not comparable else (
        summary["speedup_tokens_per_s"] >= t["speedup_min"]
        and summary["peak_memory_ratio"] <= t["memory_ratio_max"] and rel <= t["loss_rel_max"])
    return _emit(json.dumps(summary, indent=2), args.out)


def _emit(text: str, out: str | None) -> int:
    """Print the JSON, and write it to ``out`` too when given (``--out``); exit status 0."""
    print(text)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


def _strip_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """``argv`` without the options ``names`` (``--x v`` and ``--x=v`` forms)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in names:
            skip = True
        elif not a.startswith(tuple(n + "=" for n in names)):
            out.append(a)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
