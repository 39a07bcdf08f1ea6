"""The `varejax` command: one subcommand per stage of the job.

    varejax convert infinity --src infinity_2b_reg.pth --arch 2b --out models/infinity_2b
"""

from __future__ import annotations

import argparse
import sys

from varejax.convert import cli as convert_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="varejax", description="Concept erasure for Infinity, in JAX.")
    from varejax import __version__
    parser.add_argument("--version", action="version", version=f"varejax {__version__}")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    convert_cli.add_parser(stages)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.stage == "convert":
        return convert_cli.run(args)
    raise AssertionError(args.stage)


if __name__ == "__main__":
    sys.exit(main())
