"""Ablation on the toy world: S-VARE against its parts and the baselines, same pairs and seeds.

    python benchmarks/toy_ablation.py --config configs/toy_circle.py --workdir runs/ablation
    python benchmarks/toy_ablation.py --config configs/toy_circle.py:ci --workdir runs/ablation_ci

Variants (each a fresh erasure of the shipped base model from the same VARE trajectories, same steps,
learning rate, batches and evaluation seeds; "no erasure" is the baseline measured in the same run):

| variant | erase loss | preservation step |
|---|---|---|
| no erasure | - | - |
| plain CE | CE on the anchor bits, every token | no |
| VARE-basic | squared distance of bit distributions to the frozen model under c | no |
| L_FCE only | filtered CE (alpha 0.25) | no |
| S-VARE alpha 0 / 0.25 / 0.5 | filtered CE | L_Pre (official alternating steps) |
| ESD-style | KL to negative-guided frozen logits | no |
| concept ablation | KL to the frozen anchor distribution | no |

Writes `ablation.json` and `ablation.md` (one table: erasure rate on seen and paraphrased prompts,
preservation, toy FID, and with `config.attacks.enabled` the strongest attack's ASR: see
`varejax.eval.attacks`) in the workdir and prints the table. The "no erasure" row's toy FID is the sampling
noise floor: the base model's "others" images against a second sample of the same prompts with other seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

VARIANTS = [
    # name, erase_loss, mode, alpha
    ("plain CE", "plain_ce", "erase_only", 0.25),
    ("VARE-basic", "vare_basic", "erase_only", 0.25),
    ("L_FCE only", "fce", "erase_only", 0.25),
    ("S-VARE alpha 0", "fce", "alternating", 0.0),
    ("S-VARE alpha 0.25", "fce", "alternating", 0.25),
    ("S-VARE alpha 0.5", "fce", "alternating", 0.5),
    ("ESD-style", "esd", "erase_only", 0.25),
    ("concept ablation", "concept_ablation", "erase_only", 0.25),
]


def main() -> None:
    from varejax.configlib import load_config, parse_args
    from varejax.erase.trainer import prepare_erase, run_erase
    from varejax.eval.attacks.asr import config_attacks, strongest_asr
    from varejax.eval.report import markdown_table, text_table
    from varejax.toy.job import ToyBench, write_pair_files

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/toy_circle.py")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--only", default="", help="comma-separated variant names to run (default: all)")
    args, overrides = parse_args(parser)
    config = load_config(args.config, overrides)
    workdir = Path(args.workdir)
    start = time.time()
    bench = ToyBench(config, workdir)
    write_pair_files(config, workdir)
    before = bench.all_images(bench.base_params)
    # Prepare the VARE trajectories once; every variant links to them.
    prepare_erase(config, workdir / "shared", models=bench.models())
    rows, records = [], {}
    baseline = bench.measure(before, before)
    # With the same seeds an unchanged model draws the same images (toy FID 0 by construction, nothing
    # measured); the row reports the base model against itself with other seeds instead: the spread that
    # sampling alone gives, the reference for the variants' FIDs.
    baseline["toy_fid"] = bench.toy_fid_noise_floor(bench.base_params, before["others"])
    rows.append(["no erasure", baseline["erasure_rate_seen_before"], baseline["erasure_rate_paraphrase_before"],
                 baseline["preservation_before"], baseline["toy_fid"]])
    # With config.attacks.enabled: the strongest attack's ASR (max over the attacks of varejax.eval.attacks,
    # mean over concepts), the original model once, then each variant (its own gradient attack).
    attacks = config_attacks(config, bench, None)
    if attacks:
        baseline["attacks"] = attacks
        rows[-1].append(float(sum(strongest_asr(a, "before") for a in attacks.values()) / len(attacks)))
    records["no erasure"] = baseline
    wanted = {v.strip() for v in args.only.split(",") if v.strip()}
    for name, loss, mode, alpha in VARIANTS:
        if wanted and name not in wanted:
            continue
        run_dir = workdir / name.replace(" ", "_").replace(".", "")
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "trajectories").exists():
            os.symlink((workdir / "shared" / "trajectories").absolute(), run_dir / "trajectories")
        variant = load_config(args.config, overrides)
        variant.pairs, variant.schedule = config.pairs, config.schedule
        variant.train.erase_loss, variant.train.mode, variant.train.alpha = loss, mode, alpha
        result = run_erase(variant, run_dir, models=bench.models())
        measured = bench.measure(before, bench.all_images(result.params))
        records[name] = measured
        rows.append([name, measured["erasure_rate_seen_after"], measured["erasure_rate_paraphrase_after"],
                     measured["preservation_after"], measured["toy_fid"]])
        if attacks:
            measured["attacks"] = config_attacks(config, bench, result.params, measure_before=False)
            rows[-1].append(float(sum(strongest_asr(a) for a in measured["attacks"].values()) / len(attacks)))
    header = ["variant", "erasure rate (seen)", "erasure rate (paraphrase)", "preservation", "toy FID"]
    header += ["ASR (strongest attack)"] if attacks else []
    (workdir / "ablation.json").write_text(json.dumps({"concepts": bench.concepts, "steps": int(config.train.steps),
                                                       "variants": records,
                                                       "wall_time_s": round(time.time() - start, 1),
                                                       "command": shlex.join(["python", *sys.argv])}, indent=1))
    (workdir / "ablation.md").write_text(f"# Toy ablation: {', '.join(bench.concepts)}\n\n"
                                         + markdown_table(header, rows) + "\n")
    print(text_table(header, rows))
    print(f"wall time {time.time() - start:.0f} s; {workdir / 'ablation.md'}")


if __name__ == "__main__":
    main()
