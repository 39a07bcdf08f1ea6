"""`varejax convert <model> --src PATH --arch ARCH --out DIR [--dry-run]`; model: infinity | vae | t5."""

from __future__ import annotations

import argparse
import sys

from varejax.convert.sources import CheckpointError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="convert upstream PyTorch checkpoints (strict, safe)",
                                   description=__doc__)
    models = parser.add_subparsers(dest="model", required=True, metavar="MODEL")
    infinity = models.add_parser("infinity", help="the Infinity transformer (2B, 8B)")
    infinity.add_argument("--src", required=True, help="state_dict .pth, training checkpoint, or sharded HF folder")
    infinity.add_argument("--arch", required=True, help="2b | 8b | a preset name | CONFIG.json")
    infinity.add_argument("--out", help="output folder (orbax params + config.json)")
    infinity.add_argument("--dry-run", action="store_true", help="check keys and shapes only; write nothing")
    infinity.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
    infinity.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    infinity.set_defaults(run=_run_infinity)

    vae = models.add_parser("vae", help="the BSQ-VAE bitwise tokenizer (d32 for 2B, d14 for 8B)")
    vae.add_argument("--src", required=True, help="{'vae': state_dict} .pth (or a plain state_dict)")
    vae.add_argument("--arch", required=True, help="d32 | d14 | a preset name | CONFIG.json")
    vae.add_argument("--out", help="output folder (orbax params + config.json)")
    vae.add_argument("--dry-run", action="store_true", help="check keys, shapes and buffers only; write nothing")
    vae.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
    vae.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    vae.set_defaults(run=_run_vae)
    _add_t5_parser(models)


def _run_infinity(args: argparse.Namespace) -> int:
    from varejax.convert.infinity import convert_infinity

    if not args.dry_run and not args.out:
        print("error: --out is required unless --dry-run", file=sys.stderr)
        return 2
    report = convert_infinity(args.src, args.arch, args.out, dry_run=args.dry_run, param_dtype=args.param_dtype,
                              overwrite=args.overwrite, progress=sys.stderr.isatty())
    print(report.summary())
    return 0


def _run_vae(args: argparse.Namespace) -> int:
    from varejax.convert.vae import convert_vae

    if not args.dry_run and not args.out:
        print("error: --out is required unless --dry-run", file=sys.stderr)
        return 2
    report = convert_vae(args.src, args.arch, args.out, dry_run=args.dry_run, param_dtype=args.param_dtype,
                         overwrite=args.overwrite, progress=sys.stderr.isatty())
    print(report.summary())
    return 0


def run(args: argparse.Namespace) -> int:
    """Runs a parsed convert command; user errors print one clear message and exit with status 2."""
    from varejax.checkpoint import ModelDirError

    try:
        return args.run(args)
    except (CheckpointError, ModelDirError, KeyError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2


def _add_t5_parser(models: argparse._SubParsersAction) -> None:
    t5 = models.add_parser("t5", help="the Flan-T5 text encoder (from a local HF folder)")
    t5.add_argument("--src", required=True, help="HF T5 folder: config.json + safetensors/.bin weights (sharded ok)")
    t5.add_argument("--out", help="output folder (orbax params + config.json + tokenizer.json)")
    t5.add_argument("--dry-run", action="store_true", help="check config, keys and shapes only; write nothing")
    t5.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
    t5.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    t5.set_defaults(run=_run_t5)


def _run_t5(args: argparse.Namespace) -> int:
    from varejax.convert.t5 import convert_t5

    if not args.dry_run and not args.out:
        print("error: --out is required unless --dry-run", file=sys.stderr)
        return 2
    report = convert_t5(args.src, args.out, dry_run=args.dry_run, param_dtype=args.param_dtype,
                        overwrite=args.overwrite, progress=sys.stderr.isatty())
    print(report.summary())
    return 0
