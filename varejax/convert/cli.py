"""`varejax convert <model> --src PATH [--arch ARCH] --out DIR [--dry-run]`; model: infinity | vae | t5 | inception."""

from __future__ import annotations

import argparse
import sys

from varejax.convert.sources import CheckpointError

# model: (help, --src help, --arch help or None when the source carries its config, --dry-run help)
MODELS = {
    "infinity": ("the Infinity transformer (2B, 8B)",
                 "state_dict .pth, training checkpoint, or sharded HF folder",
                 "2b | 8b | a preset name | CONFIG.json",
                 "check keys and shapes only; write nothing"),
    "vae": ("the BSQ-VAE bitwise tokenizer (d32 for 2B, d14 for 8B)",
            "{'vae': state_dict} .pth (or a plain state_dict)",
            "d32 | d14 | a preset name | CONFIG.json",
            "check keys, shapes and buffers only; write nothing"),
    "t5": ("the Flan-T5 text encoder (from a local HF folder)",
           "HF T5 folder: config.json + safetensors/.bin weights (sharded ok)",
           None,
           "check config, keys and shapes only; write nothing"),
    "clip": ("CLIP (ViT-B/32, ViT-L/14, ...; from a local HF CLIPModel folder) for CLIP score / zero-shot",
             "HF CLIP folder: config.json + safetensors/.bin weights (+ tokenizer files, copied)",
             None,
             "check config, keys and shapes only; write nothing"),
    "inception": ("the FID Inception network (pytorch-fid's weights, read without torch)",
                  "pt_inception-2015-12-05-6726825d.pth (pytorch-fid's weights file)",
                  None,
                  "check keys and shapes only; write nothing"),
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="convert upstream PyTorch checkpoints (strict, safe)",
                                   description=__doc__)
    models = parser.add_subparsers(dest="model", required=True, metavar="MODEL")
    for name, (help_text, src_help, arch_help, dry_run_help) in MODELS.items():
        sub = models.add_parser(name, help=help_text)
        sub.add_argument("--src", required=True, help=src_help)
        if arch_help:
            sub.add_argument("--arch", required=True, help=arch_help)
        files = "orbax params + config.json" + (" + tokenizer.json" if name == "t5" else "")
        sub.add_argument("--out", help=f"output folder ({files})")
        sub.add_argument("--dry-run", action="store_true", help=dry_run_help)
        sub.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
        sub.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
        sub.set_defaults(run=_convert)


def _convert(args: argparse.Namespace) -> int:
    if not args.dry_run and not args.out:
        print("error: --out is required unless --dry-run", file=sys.stderr)
        return 2
    options = dict(dry_run=args.dry_run, param_dtype=args.param_dtype, overwrite=args.overwrite,
                   progress=sys.stderr.isatty())
    if args.model == "infinity":
        from varejax.convert.infinity import convert_infinity
        report = convert_infinity(args.src, args.arch, args.out, **options)
    elif args.model == "vae":
        from varejax.convert.vae import convert_vae
        report = convert_vae(args.src, args.arch, args.out, **options)
    elif args.model == "clip":
        from varejax.convert.clip import convert_clip
        report = convert_clip(args.src, args.out, **options)
    elif args.model == "inception":
        from varejax.convert.inception import convert_inception
        report = convert_inception(args.src, args.out, **options)
    else:
        from varejax.convert.t5 import convert_t5
        report = convert_t5(args.src, args.out, **options)
    print(report.summary())
    return 0


def run(args: argparse.Namespace) -> int:
    """Runs a parsed convert command.

    User errors (an unreadable or mismatched checkpoint, a bad --arch, an existing --out folder) print one
    line and exit with status 2; anything else is a bug and keeps its traceback.

    On several processes (a pod slice, `launch/local.sh N`), process 0 alone reads the source and writes
    --out (one writer for a shared folder); the others wait for its exit status and return the same one, so
    every process ends together and a failure on process 0 fails them all.
    """
    from varejax.parallel.distributed import run_on_main

    return run_on_main(lambda: _run_here(args), "convert")


def _run_here(args: argparse.Namespace) -> int:
    from varejax.checkpoint import ModelDirError

    try:
        return args.run(args)
    except (CheckpointError, ModelDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
