"""`varejax sweep --config configs/sweep_toy.py --workdir DIR [--config.field=value ...]`."""

from __future__ import annotations

import argparse
import os
import shlex


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep", help="many erasures from one grid config: shared trajectories, stacked training, one table",
        description="Expands the config's grid into named runs (WORKDIR/runs/NAME, each a normal erase workdir), "
                    "prepares shared work once, trains runs that can share a step together, evaluates every "
                    "run, and writes WORKDIR/results.csv, results.jsonl and report.md. Re-running resumes; "
                    "finished runs are never redone; added grid points run alone.")
    parser.add_argument("--config", default="configs/sweep_toy.py",
                        help="sweep config file[:arg] (default configs/sweep_toy.py)")
    parser.add_argument("--workdir", required=True, help="sweep folder (re-running resumes)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from varejax.configlib import load_config
    from varejax.parallel.distributed import is_main_process
    from varejax.sweep.runner import run_sweep

    config = load_config(args.config, overrides)
    config_dir = os.path.dirname(os.path.abspath(args.config.partition(":")[0]))
    command = shlex.join(["varejax", "sweep", "--config", args.config, "--workdir", args.workdir]
                         + [f"--{o}" for o in overrides])
    rows = run_sweep(config, args.workdir, config_dir=config_dir, command=command)
    if is_main_process():
        print(f"{len(rows)} runs finished; table in {args.workdir}/results.csv, report in {args.workdir}/report.md")
    return 0
