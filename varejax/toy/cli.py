"""`varejax toy train|eval [--workdir DIR] [--config configs/toy_train.py[:smoke]] [--config.field=value ...]`."""

from __future__ import annotations

import argparse
import json
import shlex


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("toy", help="the toy world: train its small models from scratch, evaluate them",
                                   description="Trains the toy world's oracle, tokenizer, T5 and Infinity on CPU, "
                                               "or re-runs the evaluation of trained ones.")
    actions = parser.add_subparsers(dest="toy_action", required=True, metavar="ACTION")
    train = actions.add_parser("train", help="train every toy model (writes WORKDIR/models, logs, previews)",
                               description="Writes WORKDIR/models/{infinity,vae,t5,oracle}, world.json and "
                                           "train.log; --config.install=True copies them into varejax/toy/assets/.")
    train.add_argument("--config", default="configs/toy_train.py", help="config file[:arg] (arg: smoke)")
    train.add_argument("--workdir", default="runs/toy", help="output folder (default runs/toy)")
    evaluate = actions.add_parser(
        "eval", help="re-run the evaluation on trained model folders (default: the shipped ones)",
        description="Samples the models with the config's eval settings and writes WORKDIR/evaluation.json "
                    "(accuracy per prompt family and attribute, per prompted value with what was read instead, "
                    "circle prompts) and WORKDIR/samples.png.")
    evaluate.add_argument("--config", default="configs/toy_train.py", help="config file[:arg] (its eval and seed)")
    evaluate.add_argument("--workdir", default="runs/toy_eval", help="output folder (default runs/toy_eval)")
    evaluate.add_argument("--models", default=None,
                          help="folder holding infinity/, vae/, t5/, oracle/ (default: varejax/toy/assets)")
    parser.set_defaults(run=run)


def command_line(args: argparse.Namespace, overrides: list[str]) -> str:
    """The command as run (options normalised), for the records the stage writes."""
    words = ["varejax", "toy", args.toy_action, "--config", args.config, "--workdir", args.workdir]
    if getattr(args, "models", None):
        words += ["--models", args.models]
    return shlex.join(words + [f"--{o}" for o in overrides])  # overrides arrive as "config.x=y"


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from varejax.configlib import load_config

    config = load_config(args.config, overrides)
    if args.toy_action == "eval":
        from varejax.toy.evaluate import run_eval
        from varejax.toy.spec import EVAL_FILE

        record = run_eval(config, args.workdir, args.models, command=command_line(args, overrides))
        print(json.dumps(record["prompt_following"]["all_said"]))
        print(f"evaluation of {record['models']} in {args.workdir}/{EVAL_FILE} ({record['seconds']:.0f}s)")
        return 0
    from varejax.toy.train import run as train

    summary = train(config, args.workdir, command=command_line(args, overrides))
    print(f"toy models in {args.workdir}/models ({summary['seconds']['total']:.0f}s)")
    return 0
