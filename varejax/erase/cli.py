"""`varejax erase [prepare|train|all] --config configs/erase.py:CONCEPT --workdir DIR [--config.x=y ...]`.

Without --config it runs the embedded default: erasing "circle" from the shipped toy world (the same
job as configs/toy_circle.py), which needs no files outside the installed package.
"""

from __future__ import annotations

import argparse
import os


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("erase", help="S-VARE concept erasure (prepare trajectories, train, export)",
                                   description=__doc__)
    parser.add_argument("phase", nargs="?", default="all", choices=("all", "prepare", "train"),
                        help="prepare = only the VARE anchor trajectories (resumable); train and all = prepare what is "
                             "missing, train (resuming from the last checkpoint), export")
    parser.add_argument("--config", default=None,
                        help="config file[:arg] (default: the embedded toy-world job, as configs/toy_circle.py)")
    parser.add_argument("--workdir", required=True, help="run folder (re-running resumes)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from varejax.configlib import load_config
    from varejax.errors import ConfigError

    config = load_config(args.config, overrides, default=_embedded_toy_config)
    if "toy" in config:  # the embedded toy world: erase, sample before/after, evaluate, report
        if args.phase != "all":
            raise ConfigError("toy-world configs run the whole job; drop the phase argument")
        from varejax.toy.job import run_toy_job
        run_toy_job(config, args.workdir)
        return 0
    from varejax.erase.trainer import prepare_erase, run_erase

    config_dir = os.path.dirname(os.path.abspath(args.config.partition(":")[0]))
    if args.phase == "prepare":
        prepare_erase(config, args.workdir, config_dir=config_dir)
        print(f"trajectories in {args.workdir}/trajectories")
        return 0
    result = run_erase(config, args.workdir, config_dir=config_dir)
    print(f"{result.steps} steps in {result.seconds:.0f}s; erased model in {args.workdir}/model, "
          f"deltas in {args.workdir}/delta.safetensors")
    return 0


def _embedded_toy_config():
    from varejax.toy.job import main_job_config

    return main_job_config().lock()
