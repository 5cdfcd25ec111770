"""``python -m crl_ray.sweep FILE [key=value ...] [--dry-run] [--resume]``: the sweep's command line."""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Sequence

from crl_ray.errors import USAGE_EXIT_CODE, UserError
from crl_ray.sweep.run import (
    EXIT_INTERRUPTED,
    render_outcome,
    render_plan,
    resource_plan,
    run_sweep,
)

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m crl_ray.sweep",
        description="Run a crl_ray sweep (Ray Tune + Optuna over CRL training runs, MLflow for every run).",
        epilog="Example: python -m crl_ray.sweep sweeps/smoke.yaml loss.margin_benign=3 --dry-run",
    )
    parser.add_argument("file", help="sweep file (YAML), e.g. sweeps/smoke.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="override config values (YAML syntax), e.g. train.steps=10 search.num_trials=2")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate and print the resolved config, search space and resource plan; "
                        "start nothing, write nothing")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name "
                        "(a plain run of an existing sweep with the same config resumes it too)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Sequence[str] | None = None, *, job=None) -> int:
    """The CLI; ``job`` replaces the per-trial work (tests only)."""
    args = build_parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from crl_ray.validate import load_config

    try:
        cfg, info = load_config(args.file, args.overrides)
        plan = resource_plan(cfg)
        if args.dry_run:
            print(render_plan(cfg, info, plan))
            return 0
        outcome = run_sweep(cfg, resume=args.resume, job=job)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_EXIT_CODE
    except KeyboardInterrupt:
        print(f"interrupted; resume with: {resume_command(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(render_outcome(outcome, resume_command(args)))
    if outcome.interrupted:
        return EXIT_INTERRUPTED
    return 0 if outcome.count("completed") + outcome.count("stopped_early") else 1


def resume_command(args: argparse.Namespace) -> str:
    """The command line that resumes this sweep."""
    parts = ["python", "-m", "crl_ray.sweep", args.file, *args.overrides, "--resume"]
    return " ".join(shlex.quote(p) for p in parts)


if __name__ == "__main__":
    sys.exit(main())
