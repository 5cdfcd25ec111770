"""Standalone FSDP2 + LoRA fine-tuning micro-benchmark / smoke test.

Builds a random-init ``LlamaForCausalLM``, wraps it with peft LoRA, shards it with
FSDP2 (``torch.distributed.fsdp.fully_shard``) and runs a few training steps with a
CRL-like loss (LM cross-entropy + a representation term comparing hidden states of
the adapted model against the same model with adapters disabled).

Only depends on torch, transformers, peft and the standard library so it can be run
on its own on a GPU machine::

    python -m crl_ray.bench fsdp --world-size 1 --device cuda --out bench.json

Rank 0 prints exactly one JSON line (prefixed by nothing) with the results and the
process exits non-zero if any check fails or anything goes wrong.  Works either by
spawning ``--world-size`` processes itself or under ``torchrun`` (when RANK and
WORLD_SIZE are set in the environment).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import os
import socket
import sys
import tempfile
import time
import traceback
from datetime import timedelta

# --------------------------------------------------------------------------- args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m crl_ray.bench fsdp",
        description="FSDP2 + LoRA fine-tuning benchmark on a random-init Llama model.",
    )
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4, help="per-rank micro batch size")
    p.add_argument("--steps", type=int, default=6, help="measured steps (after warmup)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured warmup steps")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--rep-weight", type=float, default=0.1,
                   help="weight of the hidden-state representation term")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto = bf16 on cuda, fp32 on cpu")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0,
                   help="hard wall-clock limit in seconds for the whole run (watchdog)")
    p.add_argument("--out", type=str, default=None, help="also write the JSON here")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but torch.cuda.is_available() is False")
    if args.dtype == "auto":
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    if args.world_size < 1:
        raise ValueError("--world-size must be >= 1")
    if args.steps < 1:
        raise ValueError("--steps must be >= 1")
    if args.warmup < 0:
        raise ValueError("--warmup must be >= 0")
    if args.hidden % args.heads != 0:
        raise ValueError("--hidden must be divisible by --heads")
    if args.heads % args.kv_heads != 0:
        raise ValueError("--heads must be divisible by --kv-heads")
    return args


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- helpers


def _rep_layer_indices(n_layers: int) -> list[int]:
    """2-3 middle entries of ``hidden_states`` (index 0 = embeddings, n = final norm)."""
    if n_layers <= 1:
        return [1]
    idx = {n_layers // 4, n_layers // 2, (3 * n_layers) // 4}
    idx = sorted({min(max(i, 1), n_layers - 1) for i in idx})
    return idx


def _local(t):
    """Local shard of a (possibly DTensor) parameter as a plain tensor."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def _full(t):
    full = getattr(t, "full_tensor", None)
    return full() if full is not None else t


def _peak_rss_gb() -> float:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / (1024.0 ** 2)


# --------------------------------------------------------------------------- worker


def run_worker(rank: int, world_size: int, local_rank: int, args: argparse.Namespace,
               init_method: str, result_path: str | None) -> dict | None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    t_start = time.perf_counter()
    on_cuda = args.device == "cuda"
    if on_cuda:
        n_dev = torch.cuda.device_count()
        if local_rank >= n_dev:
            raise RuntimeError(f"local rank {local_rank} but only {n_dev} cuda device(s)")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
        if args.dtype == "fp32":
            try:
                torch.set_float32_matmul_precision("high")  # TF32 matmuls
            except Exception:  # pragma: no cover
                pass
    else:
        device = torch.device("cpu")
        backend = "gloo"

    pg_kwargs = dict(backend=backend, init_method=init_method, rank=rank,
                     world_size=world_size, timeout=timedelta(minutes=2))
    if on_cuda:
        pg_kwargs["device_id"] = device
    dist.init_process_group(**pg_kwargs)
    try:
        mesh = init_device_mesh(device.type, (world_size,))

        # ---------------------------------------------------------------- model
        torch.manual_seed(args.seed)  # identical init on every rank
        if on_cuda:
            torch.cuda.manual_seed_all(args.seed)
        config = LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            max_position_embeddings=max(2048, args.seq),
            tie_word_embeddings=False,
            use_cache=False,
        )
        try:
            config._attn_implementation = "sdpa"
        except Exception:  # pragma: no cover - attribute name changes
            pass
        t0 = time.perf_counter()
        with device:
            model = LlamaForCausalLM(config)
        model.to(torch.float32)
        params_base = sum(p.numel() for p in model.parameters())

        lora_cfg = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_r,
            lora_dropout=0.05,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                            "gate_proj", "up_proj", "down_proj"],
            bias="none",
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, lora_cfg)
        peft_model.to(device)
        params_total = sum(p.numel() for p in peft_model.parameters())
        params_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        build_s = time.perf_counter() - t0

        # ---------------------------------------------------------------- FSDP2
        if args.dtype == "bf16":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        hf_model = peft_model.base_model.model  # the LlamaForCausalLM (lora-injected)
        layers = hf_model.model.layers
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(hf_model, mesh=mesh, mp_policy=mp)
        phase_s = {"init": t0 - t_start, "build": build_s,
                   "shard": time.perf_counter() - t0 - build_s}
        t1 = time.perf_counter()
        peft_model.train()
        named = dict(peft_model.named_parameters())
        trainable = [(n, p) for n, p in named.items() if p.requires_grad]
        frozen = [(n, p) for n, p in named.items() if not p.requires_grad]
        if not trainable:
            raise RuntimeError("no trainable (LoRA) parameters found")
        opt = torch.optim.AdamW([p for _, p in trainable], lr=args.lr, weight_decay=0.0)

        # ------------------------------------------------ snapshots for checks
        base_probe_names = []
        for suffix in ("embed_tokens.weight",
                       "layers.0.self_attn.q_proj.base_layer.weight",
                       f"layers.{args.layers - 1}.mlp.down_proj.base_layer.weight"):
            hits = [n for n in named if n.endswith(suffix)]
            if hits:
                base_probe_names.append(hits[0])
        base_before = {}
        for n in base_probe_names:  # full_tensor() is a collective: all ranks call it
            ft = _full(named[n].detach()).float().cpu().clone()
            if rank == 0:
                base_before[n] = ft
            del ft

        def frozen_checksums():
            vals = []
            for _, p in frozen:
                loc = _local(p.detach())
                if loc.numel():
                    vals.append(torch.stack([
                        loc.sum(dtype=torch.float64),
                        torch.linalg.vector_norm(loc, dtype=torch.float64)]))
                else:
                    vals.append(torch.zeros(2, dtype=torch.float64, device=loc.device))
            return torch.stack(vals).cpu()

        frozen_ck_before = frozen_checksums()
        lora_before = [_local(p.detach()).clone() for _, p in trainable]

        # ---------------------------------------------------------------- train
        # FSDP2 lazily initialises its mixed-precision dtypes on the first forward,
        # looking at which params require grad.  peft's disable_adapter() flips the
        # LoRA params to requires_grad=False, so if the very first forward were the
        # reference (adapter-disabled) one, FSDP2 would treat every group as frozen
        # and skip the bf16->fp32 gradient cast.  Run one tiny forward with the
        # adapters enabled first so lazy init sees the real trainable set.
        with torch.no_grad():
            peft_model(input_ids=torch.zeros((1, 8), dtype=torch.long, device=device),
                       logits_to_keep=1)
        if hasattr(hf_model, "reshard"):
            hf_model.reshard()  # root keeps params unsharded after forward otherwise

        phase_s["snapshot_lazyinit"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        rep_idx = _rep_layer_indices(args.layers)
        gen = torch.Generator(device=device)
        total_steps = args.warmup + args.steps
        losses, ce_losses, rep_losses, step_times = [], [], [], []
        grad_dtypes: set[str] = set()
        grads_seen = 0
        if on_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        dist.barrier()
        for step in range(total_steps):
            gen.manual_seed(args.seed * 7919 + 1000003 * rank + step + 1)
            input_ids = torch.randint(0, args.vocab, (args.batch, args.seq),
                                      generator=gen, device=device)
            if on_cuda:
                torch.cuda.synchronize()
            ts = time.perf_counter()

            with torch.no_grad(), peft_model.disable_adapter():
                ref = peft_model(input_ids=input_ids, output_hidden_states=True,
                                 logits_to_keep=1)
                ref_h = [ref.hidden_states[i].detach() for i in rep_idx]
                del ref
            out = peft_model(input_ids=input_ids, labels=input_ids,
                             output_hidden_states=True)
            ce = out.loss.float()
            rep = sum(F.mse_loss(out.hidden_states[i].float(), r.float())
                      for i, r in zip(rep_idx, ref_h)) / len(rep_idx)
            loss = ce + args.rep_weight * rep
            loss.backward()
            for _, p in trainable:
                if p.grad is not None:
                    grad_dtypes.add(str(_local(p.grad).dtype).replace("torch.", ""))
                    grads_seen += 1
            opt.step()
            opt.zero_grad(set_to_none=True)
            del out, ref_h

            if on_cuda:
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - ts)
            losses.append(loss.detach())
            ce_losses.append(ce.detach())
            rep_losses.append(rep.detach().float())

        # ------------------------------------------------------------- metrics
        phase_s["train"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        stats = torch.stack([torch.stack(losses), torch.stack(ce_losses),
                             torch.stack(rep_losses)]).float().to(device)
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        stats = (stats / world_size).cpu()
        losses_g = [float(x) for x in stats[0]]
        ce_g = [float(x) for x in stats[1]]
        rep_g = [float(x) for x in stats[2]]

        measured = step_times[args.warmup:]
        t_meas = torch.tensor([sum(measured)], dtype=torch.float64, device=device)
        dist.all_reduce(t_meas, op=dist.ReduceOp.MAX)  # slowest rank bounds the step
        s_per_step = float(t_meas.item()) / len(measured)
        tokens_per_s = args.batch * args.seq * world_size / s_per_step

        if on_cuda:
            peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 1024 ** 3,
                                 torch.cuda.max_memory_reserved(device) / 1024 ** 3],
                                dtype=torch.float64, device=device)
        else:
            peak = torch.tensor([_peak_rss_gb(), 0.0], dtype=torch.float64, device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)

        # -------------------------------------------------------------- checks
        finite = all(math.isfinite(x) for x in losses_g + ce_g + rep_g)

        n_train = len(trainable)
        moved = torch.zeros(n_train, dtype=torch.float64)
        for k, ((_, p), before) in enumerate(zip(trainable, lora_before)):
            loc = _local(p.detach())
            if loc.numel():
                moved[k] = (loc.float() - before.float()).abs().sum().double().cpu()
        moved = moved.to(device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        moved = moved.cpu()
        b_idx = [k for k, (n, _) in enumerate(trainable) if "lora_B" in n]
        b_moved = sum(1 for k in b_idx if moved[k] > 0)
        all_moved = int((moved > 0).sum())
        lora_moved = bool(b_idx) and b_moved == len(b_idx) and float(moved.sum()) > 0

        frozen_ck_after = frozen_checksums()
        ck_mismatch = torch.tensor(
            [float((frozen_ck_after != frozen_ck_before).any(dim=1).sum())],
            dtype=torch.float64, device=device)
        dist.all_reduce(ck_mismatch, op=dist.ReduceOp.SUM)
        probes_equal = True
        for n in base_probe_names:
            ft = _full(named[n].detach()).float().cpu()
            if rank == 0:
                probes_equal = probes_equal and torch.equal(ft, base_before[n])
            del ft
        flag = torch.tensor([1.0 if probes_equal else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        base_frozen = bool(flag.item() > 0.5) and float(ck_mismatch.item()) == 0.0 \
            and len(base_probe_names) > 0
        grads_none = all(p.grad is None for _, p in frozen)
        # LoRA grads must arrive in the fp32 param dtype (reduce_dtype), not bf16
        gflag = torch.tensor([1.0 if (grads_seen > 0 and grad_dtypes == {"float32"}) else 0.0],
                             device=device)
        dist.all_reduce(gflag, op=dist.ReduceOp.MIN)

        if on_cuda:
            dev_name = torch.cuda.get_device_name(device)
        else:
            import platform
            dev_name = f"cpu ({platform.processor() or platform.machine()}, " \
                       f"{os.cpu_count()} cores)"

        result = {
            "device": dev_name,
            "device_type": device.type,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "peft": __import__("peft").__version__,
            "world_size": world_size,
            "backend": backend,
            "dtype": args.dtype,
            "params_total": params_total,
            "params_base": params_base,
            "params_trainable": params_trainable,
            "layers": args.layers,
            "hidden": args.hidden,
            "lora_r": args.lora_r,
            "seq": args.seq,
            "batch": args.batch,
            "steps": args.steps,
            "warmup": args.warmup,
            "s_per_step": s_per_step,
            "tokens_per_s": tokens_per_s,
            "peak_mem_gb": float(peak[0]),
            "peak_mem_kind": "cuda_max_allocated" if on_cuda else "max_rss",
            "peak_reserved_gb": float(peak[1]) if on_cuda else None,
            "losses": losses_g,
            "ce_losses": ce_g,
            "rep_losses": rep_g,
            "step_times": step_times,
            "rep_layers": rep_idx,
            "build_s": build_s,
            "phase_s": phase_s,
            "total_s": time.perf_counter() - t_start,
            "lora_grad_dtypes": sorted(grad_dtypes),
            "lora_tensors_moved": f"{all_moved}/{n_train}",
            # informational: adapted vs adapter-disabled hidden states differ once
            # LoRA-B is non-zero (step >= 1) -> disable_adapter() works under FSDP2
            "adapter_toggle_effective": (any(x > 0 for x in rep_g[1:])
                                         if len(rep_g) > 1 else None),
            "checks": {
                "finite": bool(finite),
                "lora_moved": bool(lora_moved),
                "base_frozen": bool(base_frozen),
                "frozen_grads_none": bool(grads_none),
                "lora_grads_fp32": bool(gflag.item() > 0.5),
            },
        }
        phase_s["checks"] = time.perf_counter() - t1
        result["ok"] = all(result["checks"].values())
        dist.barrier()
    finally:
        try:
            dist.destroy_process_group()
        except Exception:
            pass

    if rank == 0:
        line = json.dumps(result)
        print(line, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(line + "\n")
        if result_path:
            with open(result_path, "w") as f:
                f.write(line + "\n")
    return result


def _spawn_entry(local_rank: int, world_size: int, args: argparse.Namespace,
                 init_method: str, result_path: str) -> None:
    """torch.multiprocessing entry point: never hang, exit non-zero on failure."""
    faulthandler.dump_traceback_later(args.timeout, exit=True)
    try:
        run_worker(local_rank, world_size, local_rank, args, init_method, result_path)
    except BaseException as e:  # noqa: BLE001
        sys.stderr.write(f"[bench_fsdp rank {local_rank}] ERROR: {type(e).__name__}: {e}\n")
        traceback.print_exc()
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()


# --------------------------------------------------------------------------- main


def _main(argv: list[str] | None) -> int:
    args = resolve_args(build_parser().parse_args(argv))

    # torchrun / externally launched mode
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        faulthandler.dump_traceback_later(args.timeout, exit=True)
        rank = int(os.environ["RANK"])
        ws = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        args.world_size = ws
        res = run_worker(rank, ws, local_rank, args, "env://", None)
        return 0 if (rank != 0 or (res and res.get("ok"))) else 1

    init_method = f"tcp://127.0.0.1:{_free_port()}"
    fd, result_path = tempfile.mkstemp(prefix="bench_fsdp_", suffix=".json")
    os.close(fd)
    os.unlink(result_path)
    try:
        if args.world_size == 1:
            # run in-process: no spawn overhead
            faulthandler.dump_traceback_later(args.timeout, exit=True)
            run_worker(0, 1, 0, args, init_method, result_path)
            faulthandler.cancel_dump_traceback_later()
        else:
            import torch.multiprocessing as mp

            ctx = mp.start_processes(_spawn_entry,
                                     args=(args.world_size, args, init_method, result_path),
                                     nprocs=args.world_size, join=False,
                                     start_method="spawn")
            deadline = time.monotonic() + args.timeout + 30
            while not ctx.join(timeout=2):  # raises if a worker failed (kills the rest)
                if time.monotonic() > deadline:
                    for proc in ctx.processes:
                        if proc.is_alive():
                            proc.kill()
                    raise TimeoutError(f"workers did not finish within {args.timeout + 30:.0f}s")
        if not os.path.exists(result_path):
            raise RuntimeError("rank 0 produced no result")
        with open(result_path) as f:
            res = json.loads(f.read())
    finally:
        if os.path.exists(result_path):
            os.unlink(result_path)
    if not res.get("ok"):
        sys.stderr.write(f"bench_fsdp: CHECK FAILED: {res.get('checks')}\n")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001
        traceback.print_exc()
        sys.stderr.write(f"bench_fsdp: FAILED: {type(e).__name__}: {e}\n")
        sys.stderr.flush()
        return 1


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit avoids hanging in interpreter teardown (stray threads / NCCL)
    os._exit(rc)
