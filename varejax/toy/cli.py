"""`varejax toy train [--workdir DIR] [--config configs/toy_train.py[:smoke]] [--config.field=value ...]`."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("toy", help="the toy world: train its small models from scratch",
                                   description="Trains the toy world's oracle, tokenizer, T5 and Infinity on CPU.")
    actions = parser.add_subparsers(dest="toy_action", required=True, metavar="ACTION")
    train = actions.add_parser("train", help="train every toy model (writes WORKDIR/models, logs, previews)",
                               description="Writes WORKDIR/models/{infinity,vae,t5,oracle}, world.json and "
                                           "train.log; --config.install=True copies them into varejax/toy/assets/.")
    train.add_argument("--config", default="configs/toy_train.py", help="config file[:arg] (arg: smoke)")
    train.add_argument("--workdir", default="runs/toy", help="output folder (default runs/toy)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from varejax.configlib import load_config
    from varejax.toy.train import run as train

    config = load_config(args.config, overrides)
    summary = train(config, args.workdir)
    print(f"toy models in {args.workdir}/models ({summary['seconds']['total']:.0f}s)")
    return 0
