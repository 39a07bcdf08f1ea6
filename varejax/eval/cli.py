"""`varejax eval --config configs/eval_<task>.py --workdir DIR` and `varejax compare DIR... [--out DIR]`."""

from __future__ import annotations

import argparse
import shlex
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers the `eval` and `compare` subcommands."""
    evaluate = subparsers.add_parser(
        "eval", help="sample a task's prompts, score the images, write results.json and a report",
        description="Writes WORKDIR/images (PNG + JSON records), scores/<scorer>.npz, results.json, report.md and "
                    "report.html. A re-run with the same workdir samples and scores only what is missing.")
    evaluate.add_argument("--config", required=True,
                          help="config file[:arg], e.g. configs/eval_nudity.py or configs/eval_toy.py")
    evaluate.add_argument("--workdir", required=True, help="output folder (re-runs resume in it)")
    evaluate.set_defaults(run=run_eval)

    compare = subparsers.add_parser(
        "compare", help="eval results of several runs side by side (table and plots)",
        description="Reads results.json of each DIR (`varejax eval` workdirs of one task: base, erased, baselines) "
                    "and writes compare.md, compare.html and figures/compare_*.png in --out.")
    compare.add_argument("dirs", nargs="+", metavar="DIR", help="eval workdirs, in the table's column order")
    compare.add_argument("--out", default=None, help="output folder (default: the first DIR)")
    compare.add_argument("--names", default=None, help="comma-separated column names (default: folder names)")
    compare.set_defaults(run=run_compare)


def run_eval(args: argparse.Namespace, overrides: list[str]) -> int:
    from varejax.configlib import load_config
    from varejax.eval.run import run_eval as stage

    config = load_config(args.config, overrides)
    command = shlex.join(["varejax", "eval", "--config", args.config, "--workdir", str(args.workdir),
                          *[f"--{o}" for o in overrides]])  # overrides arrive as "config.x=y"
    stage(config, args.workdir, command=command)
    return 0


def run_compare(args: argparse.Namespace, overrides: list[str]) -> int:
    from varejax.errors import UserError
    from varejax.eval.compare import compare
    from varejax.parallel.distributed import run_on_main

    if overrides:
        raise UserError("compare takes no --config.* overrides")
    names = [n.strip() for n in args.names.split(",")] if args.names else None

    def work() -> int:
        try:
            out = compare(list(args.dirs), args.out, names)
        except UserError as err:  # process 0 alone runs this: its status reaches every process
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"comparison of {len(args.dirs)} runs: {out / 'compare.md'}")
        return 0

    return run_on_main(work, "compare")
