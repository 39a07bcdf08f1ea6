"""The `varejax` command: one subcommand per stage of the job.

    varejax convert infinity --src infinity_2b_reg.pth --arch 2b --out models/infinity_2b
    varejax sample --config configs/sample.py --workdir runs/sample --config.prompts="('a fox',)"
    varejax toy train --workdir runs/toy
"""

from __future__ import annotations

import argparse
import sys

from varejax.convert import cli as convert_cli
from varejax.erase import cli as erase_cli
from varejax.sample import cli as sample_cli
from varejax.toy import cli as toy_cli

# Stages configured by `--config file.py --config.field=value` (ml_collections); unknown args are overrides.
CONFIG_STAGES = ("sample", "erase", "toy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="varejax", description="Concept erasure for Infinity, in JAX.")
    from varejax import __version__
    parser.add_argument("--version", action="version", version=f"varejax {__version__}")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    convert_cli.add_parser(stages)
    sample_cli.add_parser(stages)
    erase_cli.add_parser(stages)
    toy_cli.add_parser(stages)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Config overrides are taken out first: argparse would read a value with spaces as a positional.
    overrides = [a[2:] for a in argv if a.startswith("--config.")]
    argv = [a for a in argv if not a.startswith("--config.")]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.stage == "convert":
        if overrides:
            parser.error("convert takes no --config.* overrides")
        return convert_cli.run(args)
    return _run_config_stage(args, overrides)


def _run_config_stage(args, overrides: list[str]) -> int:
    """Runs a config-driven stage; user errors (bad config, missing files) give one line and status 2."""
    from varejax.checkpoint import ModelDirError
    from varejax.convert.sources import CheckpointError
    from varejax.erase.trainer import NonFiniteLossError

    try:
        return args.run(args, overrides)
    except (FileNotFoundError, KeyError, ValueError, CheckpointError, ModelDirError, NonFiniteLossError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
