"""The `varejax` command: one subcommand per stage of the job.

    varejax convert infinity --src infinity_2b_reg.pth --arch 2b --out models/infinity_2b
    varejax sample --config configs/sample.py --workdir runs/sample --config.prompts="('a fox',)"
    varejax sweep --config configs/sweep_toy.py --workdir runs/sweep
    varejax eval --config configs/eval_toy.py --workdir runs/eval_toy
    varejax compare runs/eval_base runs/eval_erased --names base,erased
    varejax merge --base models/infinity_2b runs/church/delta.safetensors --out models/infinity_2b_church
    varejax toy train --workdir runs/toy
    varejax config show --config configs/erase.py:church --config.train.steps=100

Every command keeps JAX's persistent compilation cache (programs compiled by an earlier run load in
milliseconds): in $VAREJAX_JAX_CACHE, else $JAX_COMPILATION_CACHE_DIR, else ~/.cache/varejax/jax;
VAREJAX_JAX_CACHE=off turns it off.

Errors: a `varejax.errors.UserError` (a bad file, config or argument) prints one line `error: ...` and
exits with status 2; any other exception is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from varejax import configlib
from varejax.convert import cli as convert_cli
from varejax.erase import cli as erase_cli
from varejax.erase import merge as merge_cli
from varejax.errors import UserError
from varejax.eval import cli as eval_cli
from varejax.sample import cli as sample_cli
from varejax.sweep import cli as sweep_cli
from varejax.toy import cli as toy_cli


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (each sets `run(args, overrides) -> exit status`)."""
    parser = argparse.ArgumentParser(prog="varejax", description="Concept erasure for Infinity, in JAX.")
    from varejax import __version__
    parser.add_argument("--version", action="version", version=f"varejax {__version__}")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    convert_cli.add_parser(stages)
    sample_cli.add_parser(stages)
    erase_cli.add_parser(stages)
    merge_cli.add_parser(stages)
    sweep_cli.add_parser(stages)
    eval_cli.add_parser(stages)
    toy_cli.add_parser(stages)
    _add_config_parser(stages)
    return parser


def _add_config_parser(stages: argparse._SubParsersAction) -> None:
    parser = stages.add_parser("config", help="print a config fully resolved (defaults and overrides applied)",
                               description="varejax config show --config FILE[:arg] [--config.x=y ...]: prints the "
                                           "config a stage would run, every field resolved, as JSON.")
    actions = parser.add_subparsers(dest="config_action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="print the resolved config as JSON")
    show.add_argument("--config", required=True, help="config file[:arg], e.g. configs/erase.py:church")
    show.set_defaults(run=_show_config)


def _show_config(args: argparse.Namespace, overrides: list[str]) -> int:
    print(configlib.resolved_json(configlib.load_config(args.config, overrides)))
    return 0


def enable_compilation_cache() -> str | None:
    """Points JAX's persistent compilation cache at the configured folder; returns it (None: off)."""
    folder = os.environ.get("VAREJAX_JAX_CACHE") or os.environ.get("JAX_COMPILATION_CACHE_DIR") \
        or os.path.join(os.path.expanduser("~"), ".cache", "varejax", "jax")
    if folder.lower() == "off":
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", folder)
    # Programs that compile in under a second are not worth a disk write.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return folder


def main(argv: list[str] | None = None) -> int:
    """Runs one `varejax` command; returns its exit status (2 and one line on stderr for a user error)."""
    parser = build_parser()
    args, overrides = configlib.parse_args(parser, argv)
    try:
        if args.stage == "convert" and overrides:
            parser.error("convert takes no --config.* overrides")
        enable_compilation_cache()
        if args.stage != "config":  # joins a multi-host job before anything can start the XLA backend
            from varejax.parallel.distributed import initialize
            initialize()
        if args.stage == "convert":
            return convert_cli.run(args)
        return args.run(args, overrides)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
