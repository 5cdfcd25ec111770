"""``python -m crl_ray.bench overhead [FILE.yaml] [key.path=value ...]``: what the sweep machinery costs.

Runs a sweep's trials twice on the same machine and prints both wall times as one JSON object:

1. ``sweep``: the sweep CLI itself, ``python -m crl_ray.sweep FILE [overrides] storage.path=<out>/sweep``, as a
   subprocess (local Ray, Tune, Optuna, MLflow, summary, plots; interpreter start included). With an injected
   ``job`` (tests) it is ``crl_ray.sweep.run.run_sweep`` in this process instead, since a fake job cannot cross into a
   subprocess.
2. ``plain``: the same per-trial job (:class:`crl_ray.sweep.trial.TrialJob`: the same Ray Train training in the same
   segments, then the same evaluation) run one trial after the other with the values the sweep sampled, in
   this process, with no Tune, no Optuna and no MLflow. Training needs a Ray instance for its TorchTrainer, so
   the plain loop starts one too (sized the same way); its start is part of its wall time, as in the sweep.

Target (issue 5): sweep ≤ 1.2 × plain. Both runs write under ``--out`` (a temporary folder by default, removed
afterwards unless ``--keep``). Default file: sweeps/smoke.yaml.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from crl_ray.errors import USAGE_EXIT_CODE, UserError

log = logging.getLogger(__name__)

DEFAULT_FILE = Path(__file__).resolve().parents[2] / "sweeps" / "smoke.yaml"
TARGET_RATIO = 1.2


def plain_loop(cfg, trial_params: Sequence[dict[str, Any]], out: Path, job=None) -> list[dict[str, Any]]:
    """Run each trial's job (train in the sweep's segments, evaluate each segment) sequentially; per-trial results.

    ``trial_params`` are the sampled values of each trial (as Tune passed them to the driver).
    """
    import ray

    from crl_ray.config import dump_config
    from crl_ray.sweep.run import start_ray
    from crl_ray.sweep.search import segments
    from crl_ray.sweep.trial import TrialJob, resolve_trial_config

    job = job or TrialJob()
    base = dump_config(cfg)
    started = start_ray(cfg)
    results = []
    try:
        for i, params in enumerate(trial_params):
            name = f"plain-{i}"
            trial_cfg = resolve_trial_config(base, params, source=name)
            t0 = time.monotonic()
            objective = None
            for until in segments(trial_cfg):
                trained = job.train(trial_cfg, run_name=name, storage_path=out / "train", until_step=until)
                evaluation = job.evaluate(trial_cfg, trained.adapter_dir, out_dir=out / name / f"eval-step{until}")
                objective = evaluation.objective
            results.append({"trial": name, "params": params, "objective": objective,
                            "wall_s": time.monotonic() - t0})
    finally:
        if started:
            ray.shutdown()
    return results


def sweep_rows(cfg, out: Path, sweep_argv: Sequence[str], job=None) -> list[dict[str, Any]]:
    """Run the sweep into ``out`` (the CLI in a subprocess, or run_sweep in-process with a fake job); its rows."""
    import subprocess

    from crl_ray.sweep.run import run_sweep

    if job is not None:
        sweep_cfg = cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"path": str(out)})})
        outcome = run_sweep(sweep_cfg, job=job)
        if outcome.interrupted:
            raise RuntimeError("the sweep was interrupted; no timing")
        return outcome.rows
    command = [sys.executable, "-m", "crl_ray.sweep", *sweep_argv, f"storage.path={out}"]
    log.info("sweep: %s", " ".join(command))
    code = subprocess.run(command, stdout=sys.stderr).returncode  # stdout carries only the JSON result
    if code != 0:
        raise RuntimeError(f"the sweep exited with status {code}; no timing")
    return json.loads((out / cfg.name / "summary" / "results.json").read_text())


def run(cfg, out: Path, sweep_argv: Sequence[str] = (), job=None) -> dict[str, Any]:
    """The sweep, then the plain loop over the sweep's sampled values; both wall times and their ratio."""
    t0 = time.monotonic()
    rows = sweep_rows(cfg, out / "sweep", sweep_argv, job=job)
    sweep_s = time.monotonic() - t0
    params = [r["params"] for r in rows]
    t0 = time.monotonic()
    plain = plain_loop(cfg, params, out / "plain", job=job)
    plain_s = time.monotonic() - t0
    ratio = sweep_s / plain_s if plain_s > 0 else float("inf")
    return {
        "benchmark": "overhead",
        "sweep": cfg.name,
        "trials": len(params),
        "workers_per_trial": cfg.resources.num_workers,
        "steps": cfg.train.steps,
        "sweep_wall_s": sweep_s,
        "plain_wall_s": plain_s,
        "ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
        "sweep_statuses": [r["status"] for r in rows],
        "sweep_objectives": [r["objective"] for r in rows],
        "plain_trials": plain,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m crl_ray.bench overhead", description=__doc__.split("\n\n")[1])
    parser.add_argument("file", nargs="?", default=str(DEFAULT_FILE), help="sweep file (default: sweeps/smoke.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides, as for the sweep")
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON result to this file")
    return parser


def main(argv: Sequence[str] | None = None, *, job=None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from crl_ray.validate import load_config

    try:
        cfg, _ = load_config(args.file, args.overrides)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_EXIT_CODE
    out = args.out or Path(tempfile.mkdtemp(prefix="crl_overhead_"))
    if args.out is not None and args.out.exists() and any(args.out.iterdir()):
        print(f"error: --out {args.out} is not empty; pick an empty or new folder", file=sys.stderr)
        return USAGE_EXIT_CODE
    out.mkdir(parents=True, exist_ok=True)
    try:
        result = run(cfg, out.resolve(), [args.file, *args.overrides], job=job)
    finally:
        if not args.keep and args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    text = json.dumps(result, indent=1, default=str)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
