"""``python -m crl_ray.data sources | prepare FILE.yaml [key=value ...]``: the data stage's command line."""

from __future__ import annotations

import json
import logging

from crl_ray.data import build_crl_data, generator_loader, list_sources, load_model_and_tokenizer
from crl_ray.errors import UserError


def main(argv: list[str] | None = None) -> int:
    """``python -m crl_ray.data sources | prepare FILE.yaml [key=value ...]``"""
    import argparse
    import sys

    from crl_ray.errors import USAGE_EXIT_CODE

    parser = argparse.ArgumentParser(prog="python -m crl_ray.data",
                                     description="crl_ray data: list embedded sources, or build a sweep's CRL data.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("sources", help="list the embedded data sources")
    prep = sub.add_parser("prepare", help="load, answer (generate once, cached) and encode a sweep file's data")
    prep.add_argument("file")
    prep.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "sources":
        list_sources()
        return 0
    from crl_ray.assets import cache_dir
    from crl_ray.checks import load_config

    try:
        cfg, _ = load_config(args.file, args.overrides)
        _, tokenizer = load_model_and_tokenizer(cfg.model.name, cfg.model.revision)
        data = build_crl_data(cfg, tokenizer, cache_dir=cache_dir() / "generations",
                              load_generator=generator_loader(cfg))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_EXIT_CODE
    print(json.dumps({"stats": data.stats(), "provenance": data.provenance}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
