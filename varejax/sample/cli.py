"""`varejax sample --config configs/sample.py --workdir DIR [--config.field=value ...]`."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("sample", help="text to image with converted models",
                                   description="Writes images/NNNNN.png + .json records and grid.png in --workdir.")
    parser.add_argument("--config", default=None,
                        help="config file[:arg] (default: the embedded toy world, as configs/sample.py:toy)")
    parser.add_argument("--workdir", required=True, help="output folder (re-runs skip finished images)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from varejax.configlib import load_config
    from varejax.sample.pipeline import run_sampling

    if args.config is None:
        from varejax.configlib import apply_overrides
        from varejax.sample.defaults import base_config
        config = apply_overrides(base_config("toy").lock(), overrides, "the embedded toy config")
    else:
        config = load_config(args.config, overrides)
    records = run_sampling(config, args.workdir)
    print(f"{len(records)} images in {args.workdir}/images, grid in {args.workdir}/grid.png")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(1)
