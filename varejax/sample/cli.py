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
    from varejax.sample.defaults import base_config
    from varejax.sample.pipeline import run_sampling

    config = load_config(args.config, overrides, default=lambda: base_config("toy").lock())
    pipeline = schedule = None
    if not any(config.model[k] for k in ("infinity", "vae", "t5")):
        # No model given: the embedded toy world (shipped in the package, its own schedule). Resolved here,
        # in the command, so that the sampling library knows nothing of the toy world.
        from varejax.paths import as_path
        from varejax.toy.assets import TOY_SCHEDULE, load_toy_pipeline

        pipeline = load_toy_pipeline(text_cache_dir=config.text_cache_dir or str(as_path(args.workdir) / "text_cache"),
                                     **dict(config.numerics))
        schedule = TOY_SCHEDULE
    records = run_sampling(config, args.workdir, pipeline, schedule)
    print(f"{len(records)} images in {args.workdir}/images, grid in {args.workdir}/grid.png")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(1)
