"""Ablation on the toy world: S-VARE against its parts and the baselines, same pairs, seeds and tuning.

    python benchmarks/toy_ablation.py --config configs/toy_circle.py --workdir runs/ablation
    python benchmarks/toy_ablation.py --config configs/toy_circle.py:ci --workdir runs/ablation_ci \
        --seeds 2 --learning_rates 3e-4 --only "S-VARE alpha 0.25"

Variants (each a fresh erasure of the base model from VARE trajectories, same steps, batches and evaluation
prompts; "no erasure" is the base model measured in the same run):

| variant | erase loss | preservation step |
|---|---|---|
| no erasure | - | - |
| plain CE | CE on the anchor bits, every token | no |
| VARE-basic | squared distance of bit distributions to the frozen model under c | no |
| L_FCE only | filtered CE (alpha 0.25) | no |
| S-VARE alpha 0 / 0.25 / 0.5 | filtered CE | L_Pre (official alternating steps) |
| ESD-style | KL to negative-guided frozen logits | no |
| concept ablation | KL to the frozen anchor distribution | no |

Tuning, the same for every variant: each learning rate of `--learning_rates` is tried on a tuning seed
(`--tune_seed`, used for nothing else) and the one with the best score, mean erasure rate (seen and
paraphrase) + preservation, is kept (`selection_score`); every try is recorded. Then each variant runs with
its learning rate on `--seeds` seeds: seed s sets the erasure training seed (batches, PRNG), the VARE
trajectories' sampling seed and the evaluation seed (other prompts, other sampling seeds), so a cell's
spread is what a replicate of the whole experiment would move. The table gives mean +- standard deviation
over the seeds per cell; the "no erasure" row is the base model, its toy FID the sampling noise floor (the
base model's "others" images against a second sample of the same prompts with other seeds); with
`config.attacks.enabled` an ASR column (the strongest attack of `varejax.eval.attacks`, mean over concepts)
measured on the first seed only (a minute of CPU per model).

Writes `ablation.json` (per seed, per variant, the tuning runs) and `ablation.md` in the workdir and prints
the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

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


METRICS = ("erasure_rate_seen", "erasure_rate_paraphrase", "preservation", "toy_fid")


def cell_values(measured: dict, erased: bool) -> dict[str, float]:
    """The table's metrics of one measurement: the erased model's ("after"), or the base model's."""
    when = "after" if erased else "before"
    return {"erasure_rate_seen": measured[f"erasure_rate_seen_{when}"],
            "erasure_rate_paraphrase": measured[f"erasure_rate_paraphrase_{when}"],
            "preservation": measured[f"preservation_{when}"], "toy_fid": measured["toy_fid"]}


SELECTION = "mean erasure rate (seen, paraphrase) + preservation, on the tuning seed"


def selection_score(cells: dict[str, float]) -> float:
    """What the learning-rate search maximises, the same for every variant: mean erasure rate (seen and
    paraphrase) + preservation, equal weights (erasing everything or nothing both score low)."""
    return 0.5 * (cells["erasure_rate_seen"] + cells["erasure_rate_paraphrase"]) + cells["preservation"]


def choose_learning_rate(tries: dict[float, dict[str, float]]) -> float:
    """The learning rate whose tuning run scores best (`selection_score`); ties go to the smaller rate."""
    return max(sorted(tries), key=lambda lr: (selection_score(tries[lr]), -lr))


def summarise(per_seed: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """{metric: {"mean", "std", "n"}} over seeds (std with ddof 1; 0 for one seed)."""
    out = {}
    for metric in METRICS:
        values = np.array([cells[metric] for cells in per_seed], dtype=float)
        out[metric] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
                       "n": int(values.size)}
    return out


def _cell(summary: dict[str, float], digits: int) -> str:
    return f"{summary['mean']:.{digits}f} +- {summary['std']:.{digits}f}"


def table_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the ablation table (mean +- std over seeds) from `ablation.json`'s content."""
    header = ["variant", "learning rate", "erasure rate (seen)", "erasure rate (paraphrase)", "preservation",
              "toy FID"]
    with_asr = any("asr" in v for v in data["variants"].values())
    if with_asr:
        header.append("ASR (strongest attack, first seed)")
    rows = []
    for name, variant in data["variants"].items():
        s = variant["summary"]
        row = [name, "-" if variant.get("learning_rate") is None else f"{variant['learning_rate']:g}"]
        row += [_cell(s[m], 3) for m in METRICS[:3]] + [_cell(s["toy_fid"], 1)]
        if with_asr:
            row.append("" if "asr" not in variant else f"{variant['asr']:.3f}")
        rows.append(row)
    return header, rows


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
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant (training, trajectories, eval)")
    parser.add_argument("--learning_rates", default="5e-5,2e-4,1e-3", help="comma-separated learning rates searched")
    parser.add_argument("--tune_seed", type=int, default=100, help="the seed the learning-rate search runs on")
    args, overrides = parse_args(parser)
    if args.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    learning_rates = [float(v) for v in args.learning_rates.split(",") if v.strip()]
    if not learning_rates:
        raise SystemExit("--learning_rates names no learning rate")
    known = {name for name, *_ in VARIANTS}
    wanted = {v.strip() for v in args.only.split(",") if v.strip()}
    if wanted - known:
        raise SystemExit(f"--only names unknown variants {sorted(wanted - known)}; known: {sorted(known)}")
    variants = [v for v in VARIANTS if not wanted or v[0] in wanted]
    workdir = Path(args.workdir)
    start = time.time()
    base_config = load_config(args.config, overrides)
    shared_models = {}

    class Replicate:
        """One seed's world: its config, prompt sets, base images, trajectories."""

        def __init__(self, seed: int):
            self.seed, self.dir = seed, workdir / f"seed{seed}"
            self.config = self.variant_config()
            self.bench = ToyBench(self.config, self.dir, **shared_models)
            shared_models.setdefault("pipeline", self.bench.pipeline)
            shared_models.setdefault("oracle", self.bench.oracle)
            write_pair_files(self.config, self.dir)
            self.before = self.bench.all_images(self.bench.base_params)
            prepare_erase(self.config, self.dir / "shared", models=self.bench.models())

        def variant_config(self, loss=None, mode=None, alpha=None, learning_rate=None):
            config = load_config(args.config, overrides)
            config.seed = int(base_config.seed) + self.seed
            config.prepare.seed = int(base_config.prepare.seed) + self.seed
            config.eval.seed = int(base_config.eval.seed) + 1000 * self.seed
            if hasattr(self, "config"):
                config.pairs, config.schedule = self.config.pairs, self.config.schedule
            if loss is not None:
                config.train.erase_loss, config.train.mode, config.train.alpha = loss, mode, alpha
                config.train.learning_rate = learning_rate
            return config

        def erase(self, name, loss, mode, alpha, learning_rate):
            run_dir = self.dir / f"{name.replace(' ', '_').replace('.', '')}_lr{learning_rate:g}"
            run_dir.mkdir(parents=True, exist_ok=True)
            if not (run_dir / "trajectories").exists():
                os.symlink((self.dir / "shared" / "trajectories").absolute(), run_dir / "trajectories")
            config = self.variant_config(loss, mode, alpha, learning_rate)
            result = run_erase(config, run_dir, models=self.bench.models())
            return result, self.bench.measure(self.before, self.bench.all_images(result.params))

        def baseline(self):
            measured = self.bench.measure(self.before, self.before)
            # With the same seeds an unchanged model draws the same images (toy FID 0 by construction); the
            # row reports the base model against itself with other seeds instead: the noise floor.
            measured["toy_fid"] = self.bench.toy_fid_noise_floor(self.bench.base_params, self.before["others"])
            return measured

    # The learning-rate search, on its own seed.
    tuning = {}
    if len(learning_rates) > 1:
        tune = Replicate(args.tune_seed)
        for name, loss, mode, alpha in variants:
            tries = {lr: cell_values(tune.erase(name, loss, mode, alpha, lr)[1], True) for lr in learning_rates}
            chosen = choose_learning_rate(tries)
            tuning[name] = {"tries": {f"{lr:g}": {**cells, "score": selection_score(cells)}
                                      for lr, cells in tries.items()}, "chosen": chosen}
            print(f"tuning {name}: " + ", ".join(f"lr {lr:g} score {selection_score(c):.3f}"
                                                 for lr, c in tries.items()) + f" -> {chosen:g}", flush=True)

    records = {"no erasure": {"learning_rate": None, "per_seed": []}}
    records.update({name: {"learning_rate": tuning[name]["chosen"] if tuning else learning_rates[0],
                           "per_seed": []} for name, *_ in variants})
    for k in range(args.seeds):
        replicate = Replicate(k)
        baseline = replicate.baseline()
        records["no erasure"]["per_seed"].append({"seed": k, **cell_values(baseline, False)})
        attacks = config_attacks(replicate.config, replicate.bench, None) if k == 0 else {}
        if attacks:
            records["no erasure"]["asr"] = float(np.mean([strongest_asr(a, "before") for a in attacks.values()]))
        for name, loss, mode, alpha in variants:
            result, measured = replicate.erase(name, loss, mode, alpha, records[name]["learning_rate"])
            records[name]["per_seed"].append({"seed": k, **cell_values(measured, True)})
            if attacks:
                after = config_attacks(replicate.config, replicate.bench, result.params, measure_before=False)
                records[name]["asr"] = float(np.mean([strongest_asr(a) for a in after.values()]))
            print(f"seed {k} {name}: " + json.dumps({m: round(v, 3) for m, v in cell_values(measured, True).items()}),
                  flush=True)
    for record in records.values():
        record["summary"] = summarise(record["per_seed"])
    data = {"concepts": list(base_config.toy.concepts), "steps": int(base_config.train.steps),
            "seeds": args.seeds, "tune_seed": args.tune_seed if tuning else None,
            "learning_rates": learning_rates, "selection": SELECTION,
            "tuning": tuning, "variants": records, "wall_time_s": round(time.time() - start, 1),
            "command": shlex.join(["python", *sys.argv])}
    (workdir / "ablation.json").write_text(json.dumps(data, indent=1))
    header, rows = table_rows(data)
    (workdir / "ablation.md").write_text(f"# Toy ablation: {', '.join(data['concepts'])}\n\n"
                                         + markdown_table(header, rows) + "\n")
    print(text_table(header, rows))
    print(f"wall time {time.time() - start:.0f} s; {workdir / 'ablation.md'}")


if __name__ == "__main__":
    main()
