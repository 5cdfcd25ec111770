"""``python -m crl_ray.bench NAME [options]``: run one benchmark; each prints one JSON object on stdout."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "step": ("crl_ray.bench.step", "one CRL training step: the project's step vs a literal port of the reference"),
    "attack": ("crl_ray.bench.attack", "the batched embedding-space attack vs a naive one-behaviour-at-a-time port"),
    "overhead": ("crl_ray.bench.overhead", "the smoke trials through the sweep vs a plain sequential loop"),
    "fsdp": ("crl_ray.bench.fsdp", "FSDP2 + LoRA training steps of a random-init Llama (GPU or CPU): time, "
             "tokens/s, memory"),
}


def usage() -> str:
    lines = ["usage: python -m crl_ray.bench NAME [options]   (NAME --help for its options)", "", "benchmarks:"]
    lines += [f"  {name:<9} {text}" for name, (_, text) in BENCHMARKS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"error: unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHMARKS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
