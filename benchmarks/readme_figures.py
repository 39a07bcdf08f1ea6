"""README figures from the files the code writes: one step to collect results and rewrite README.md.

    python benchmarks/readme_figures.py                                   # rewrite README.md's figure blocks
    python benchmarks/readme_figures.py --check                           # exit 1 if README.md is stale
    python benchmarks/readme_figures.py --collect toy_circle=runs/toy/results.json   # then rewrite

Every measured figure of the toy world in README.md sits between `<!-- figures:NAME -->` and
`<!-- /figures:NAME -->` and is rendered here from a JSON file written by the code:

* `varejax/toy/assets/world.json`: written by `varejax toy train` with the shipped assets;
* `benchmarks/results/<name>.json`: a verbatim copy (`--collect`) of a run's `results.json`
  (`varejax erase --config configs/toy_*.py`), `ablation.json` (`benchmarks/toy_ablation.py`) or
  `base_eval.json` (`varejax toy eval`); each records the command that wrote it.

`tests/test_readme_figures.py` fails when README.md and these files disagree, so a figure cannot go stale
silently: re-run the command named in a block's source file, `--collect` its output, re-run this script.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RESULTS = REPO / "benchmarks" / "results"
WORLD = REPO / "varejax" / "toy" / "assets" / "world.json"

BLOCK = re.compile(r"(<!-- figures:(?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- /figures:(?P=name) -->)", re.S)


def _load(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the command that writes it, then "
                                f"`python benchmarks/readme_figures.py --collect {path.stem}=RUN/FILE.json`")
    return json.loads(path.read_text())


def result(name: str) -> dict:
    return _load(RESULTS / f"{name}.json")


def _f3(value) -> str:
    return "" if value is None else f"{float(value):.3f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _source(*paths: str) -> str:
    return "Source: " + ", ".join(f"`{p}`" for p in paths) + "."


def _command(data: dict) -> str:
    return f"`{data['command']}`" if data.get("command") else "(no command recorded)"


# ---- blocks -----------------------------------------------------------------------------------------

def world_block() -> str:
    w = _load(WORLD)
    acc, tok, pf, sec = w["oracle_accuracy"], w["tokenizer"], w["prompt_following"], w["seconds"]
    recon = tok["oracle_on_reconstructions"]
    rows = [
        ["oracle, held-out images (shape / colour / background)",
         f"{_f3(acc['shape'])} / {_f3(acc['colour'])} / {_f3(acc['background'])}"],
        ["oracle on tokenizer round trips (shape / colour / background)",
         f"{_f3(recon['shape'])} / {_f3(recon['colour'])} / {_f3(recon['background'])}"],
        ["tokenizer round-trip MAE (of 255)", f"{tok['reconstruction_mae_uint8']:.1f}"],
    ]
    said = pf["all_said"]
    for attr in ("shape", "colour", "background"):
        rows.append([f"base model, {attr} asked and drawn (seen / paraphrase, {pf['n']} prompts)",
                     f"{_f3(said['seen'][attr])} / {_f3(said['paraphrase'][attr])}"])
    rows.append(["base model, circle prompts that show a circle (seen / paraphrase)",
                 f"{_f3(pf['circle']['seen'])} / {_f3(pf['circle']['paraphrase'])}"])
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in sec.items() if k not in ("train_total", "total", "this_run_wall"))
    rows.append(["training time by stage", stages])
    rows.append(["training time in all", f"{sec['total'] / 60:.0f} min ({sec['total']:.0f} s)"])
    return _table(["measured", "value"], rows) + "\n\n" + _source("varejax/toy/assets/world.json")


def base_values_block() -> str:
    data = result("toy_base_eval")
    per_value = data["prompt_following"]["per_value"]
    rows = []
    for attr, values in per_value.items():
        for value, entry in values.items():
            correct = entry["read_as"].get(value, 0)
            instead = ", ".join(f"{k} {n}" for k, n in sorted(entry["read_as"].items(), key=lambda kv: -kv[1])
                                if k != value)
            rows.append([attr, value, f"{_f3(entry['accuracy'])} ({correct} of {entry['n']})", instead])
    return (_table(["attribute", "value asked", "drawn (oracle)", "read instead"], rows) + "\n\n"
            + f"Command: {_command(data)}. " + _source("benchmarks/results/toy_base_eval.json"))


def _erase_row(name: str, data: dict) -> list[str]:
    return [name, f"{_f3(data['erasure_rate_seen_before'])} -> {_f3(data['erasure_rate_seen_after'])}",
            f"{_f3(data['erasure_rate_paraphrase_before'])} -> {_f3(data['erasure_rate_paraphrase_after'])}",
            f"{_f3(data['preservation_before'])} -> {_f3(data['preservation_after'])}",
            f"{data['toy_fid']:.1f} ({data['toy_fid_noise_floor']:.1f})", _f3(data.get("prompt_following")),
            f"{data['wall_time_s']:.0f} s"]


def main_job_block() -> str:
    data = result("toy_circle")
    rows = [["erasure rate, seen prompts", _f3(data["erasure_rate_seen_before"]),
             _f3(data["erasure_rate_seen_after"])],
            ["erasure rate, unseen paraphrases", _f3(data["erasure_rate_paraphrase_before"]),
             _f3(data["erasure_rate_paraphrase_after"])],
            ["preservation, prompts without a circle", _f3(data["preservation_before"]),
             _f3(data["preservation_after"])],
            ["toy FID, original vs erased (other prompts)", "", f"{data['toy_fid']:.1f}"],
            ["toy FID noise floor (original vs itself, other seeds)", "", f"{data['toy_fid_noise_floor']:.1f}"],
            ["prompt following of the original", _f3(data["prompt_following"]), ""]]
    return (_table(["metric", "before", "after"], rows) + "\n\n"
            + f"Wall time {data['wall_time_s']:.0f} s, {data['train_steps']} steps. Command: {_command(data)}. "
            + _source("benchmarks/results/toy_circle.json"))


def attacks_block() -> str:
    """ASR of each attack before/after the main job's erasure (`attacks` in its results.json)."""
    data = result("toy_circle")
    if not data.get("attacks"):
        raise KeyError("benchmarks/results/toy_circle.json has no `attacks`: re-run the main job (attacks are on in "
                       "the full config) and --collect it")
    rows = []
    for concept, entry in data["attacks"].items():
        prefix = f"{concept}: " if len(data["attacks"]) > 1 else ""
        rows.append([prefix + "plain prompts (concept unsaid)", _f3(entry["plain"]["asr_before"]),
                     _f3(entry["plain"]["asr_after"]), str(entry["plain"].get("n_images", ""))])
        for name, attack in entry["attacks"].items():
            rows.append([f"{prefix}{name} attack", _f3(attack["asr_before"]), _f3(attack["asr_after"]),
                         str(attack.get("n_images", ""))])
    return (_table(["ASR (share of images showing the concept)", "original", "erased", "images"], rows) + "\n\n"
            + f"Command: {_command(data)}. " + _source("benchmarks/results/toy_circle.json") + " (`attacks`)")


CONFIG_RUNS = (("toy_circle", "`toy_circle.py` (object; anchor cross)"),
               ("toy_circle_ci", "`toy_circle.py:ci` (reduced, what CI runs)"),
               ("toy_striped", "`toy_striped.py` (style; anchor plain)"),
               ("toy_multi", "`toy_multi.py` (circle + striped, pairs pooled)"))


def configs_block() -> str:
    rows, sources = [], []
    for name, label in CONFIG_RUNS:
        data = result(name)
        rows.append(_erase_row(label, data))
        sources.append(f"benchmarks/results/{name}.json")
        if len(data.get("per_concept", {})) > 1:
            for concept, entry in data["per_concept"].items():
                rows.append([f"... of which {concept}",
                             f"{_f3(entry['erasure_rate_seen_before'])} -> {_f3(entry['erasure_rate_seen_after'])}",
                             f"{_f3(entry['erasure_rate_paraphrase_before'])} -> "
                             f"{_f3(entry['erasure_rate_paraphrase_after'])}", "", "", "", ""])
    header = ["config", "erasure seen", "erasure paraphrase", "preservation", "toy FID (noise floor)", "following",
              "wall"]
    return _table(header, rows) + "\n\n" + _source(*sources)


def ablation_block() -> str:
    """The ablation table (mean +- std over seeds, each variant at its searched learning rate)."""
    spec = importlib.util.spec_from_file_location("toy_ablation", Path(__file__).resolve().parent / "toy_ablation.py")
    toy_ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy_ablation)
    data = result("toy_ablation")
    header, rows = toy_ablation.table_rows(data)
    tries = ", ".join(f"{lr:g}" for lr in data["learning_rates"])
    return (_table(header, rows)
            + "\n\n" + f"Mean +- standard deviation over {data['seeds']} seeds (erasure training, VARE trajectories "
            + f"and evaluation prompts all change with the seed); {data['steps']} steps each; learning rate per "
            + f"variant chosen from {tries} on seed {data['tune_seed']} by {data['selection']}; the \"no erasure\" "
            + f"row's toy FID is the noise floor. Wall time {data['wall_time_s']:.0f} s. "
            + f"Command: {_command(data)}. " + _source("benchmarks/results/toy_ablation.json"))


def sweep_block() -> str:
    """K erasure runs stacked vs one after another (benchmarks/sweep.py)."""
    data = result("sweep")
    rows = []
    for row in data["rows"]:
        seq, stk, gain = row["sequential_steps_per_s"], row["stacked_steps_per_s"], row["speedup"]
        rows.append([str(row["runs"]), f"{seq['median']:.2f}", f"{stk['median']:.2f}",
                     f"{gain['median']:.2f}x ({gain['min']:.2f} - {gain['max']:.2f})"])
    header = ["runs K", "one after another (steps/s)", "stacked (steps/s)", "speedup (min - max)"]
    load = data["load_average_before"][0], data["load_average_after"][0]
    return (_table(header, rows) + "\n\n"
            + f"Toy world, batch {data['batch_size']}, {data['mode']} steps; median of {data['repeats']} repeats "
            + f"of {data['steps_per_repeat']} steps per run on {data['cpu_count']} CPU cores (load average "
            + f"{load[0]:.1f} before, {load[1]:.1f} after). Command: {_command(data)}. "
            + _source("benchmarks/results/sweep.json"))


def sweep_toy_block() -> str:
    """The toy sweep's table (varejax sweep --config configs/sweep_toy.py...): mean and spread over seeds."""
    import statistics

    data = result("sweep_toy")
    cells: dict[tuple, list[dict]] = {}
    for row in data["rows"]:
        grid = row["grid"]
        key = (row["concept"], grid.get("method", ""), grid.get("learning_rate", ""))
        cells.setdefault(key, []).append(row["metrics"])

    def stat(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.3f}"
        return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"

    rows = []
    for (concept, method, lr), metrics in sorted(cells.items()):
        rows.append([concept, method, lr, str(len(metrics))]
                    + [stat([m[k] for m in metrics]) for k in ("erasure_rate_seen_after",
                                                               "erasure_rate_paraphrase_after",
                                                               "preservation_after")]
                    + [f"{statistics.mean(m['toy_fid'] for m in metrics):.1f}",
                       f"{metrics[0]['toy_fid_noise_floor']:.1f}"])
    header = ["concept", "method", "lr", "seeds", "erasure (seen)", "erasure (paraphrase)", "preservation",
              "toy FID", "noise floor"]
    before = {r["concept"]: r["metrics"] for r in data["rows"]}
    base = "; ".join(f"{c}: erasure {m['erasure_rate_seen_before']:.3f} (seen), "
                     f"{m['erasure_rate_paraphrase_before']:.3f} (paraphrase), preservation "
                     f"{m['preservation_before']:.3f}" for c, m in sorted(before.items()))
    return (_table(header, rows) + "\n\n"
            + f"Before erasure ({base}). {data['finished']} runs in stacks of {max(data['stacks_this_start'] or [0])}, "
            + f"wall time {data['wall_time_s'] / 60:.1f} min on 2 CPU cores. Command: `{data['command']}`. "
            + _source("benchmarks/results/sweep_toy.json"))


def sweep_toy_main_block() -> str:
    """The main job's settings searched (configs/sweep_toy_main.py): one row per run (a column per grid
    axis), each issue-15 target marked met or not."""
    data = result("sweep_toy_main")
    axes = list(data["rows"][0]["grid"])
    rows = []
    for row in data["rows"]:
        m, grid = row["metrics"], row["grid"]
        drop = m["preservation_before"] - m["preservation_after"]
        ratio = m["toy_fid"] / m["toy_fid_noise_floor"]
        met = [m["erasure_rate_seen_after"] >= 0.95, m["erasure_rate_paraphrase_after"] >= 0.9, drop <= 0.02,
               ratio <= 2.0]
        rows.append([*(grid[a] for a in axes), _f3(m["erasure_rate_seen_after"]),
                     _f3(m["erasure_rate_paraphrase_after"]), f"{drop:.3f}", f"{ratio:.2f}x", f"{sum(met)} of 4"])
    header = [*axes, "erasure (seen)", "erasure (paraphrase)", "preservation drop", "toy FID / noise floor",
              "targets met"]
    first = data["rows"][0]["metrics"]
    stacks = len({row["stack"] for row in data["rows"]})
    return (_table(header, rows) + "\n\n"
            + f"Before erasure: erasure {first['erasure_rate_seen_before']:.3f} (seen), "
            + f"{first['erasure_rate_paraphrase_before']:.3f} (paraphrase), preservation "
            + f"{first['preservation_before']:.3f}; noise floor {first['toy_fid_noise_floor']:.1f}. Targets: erasure "
            + ">= 0.95 (seen) and >= 0.9 (paraphrase), preservation drop <= 0.02, toy FID <= 2x its floor. "
            + f"{data['finished']} runs, {data['rows'][0]['steps']} steps each, {stacks} stack{'s' * (stacks > 1)}, "
            + f"wall time {data['wall_time_s'] / 60:.1f} min. "
            + f"Command: `{data['command']}`. " + _source("benchmarks/results/sweep_toy_main.json"))


# Parity checks shown in the visible table (every other check is in the collapsed one below it).
PARITY_HEADLINE = (
    "infinity_tiny/fp32__logits_BLV", "infinity_tiny/real__fp32__logits_BLV", "infinity_tiny/activation/head_nm",
    "infinity_tiny/fp32__loss_uniform", "infinity_tiny/fp32__loss_reweight_by_scale", "infinity_tiny/rope_cos_sin",
    "infinity_tiny/cabf16__logits_BLV", "infinity_tiny/real__cabf16__logits_BLV",
    "infinity_tiny/vae/raw_features", "infinity_tiny/vae/recon_from_bits", "infinity_tiny/vae/fp32__x_BLC_wo_prefix",
    "bitwise/area_resize_vs_torch", "bitwise/bilinear_resize_vs_torch_trilinear",
    "t5/gated_gelu/last_hidden_state",
    "infinity_tiny/sampler/fp32__head_logits_2B", "infinity_tiny/sampler/fp32__cfg_logits",
    "infinity_tiny/sampler/real__fp32__decoded_img",
    "svare_tiny/case1/loss_fce", "svare_tiny/case1/grad_fce", "svare_tiny/case1/grad_pre",
    "svare_tiny/lr_default/logits_pre", "svare_tiny/lr_1e_3/logits_pre", "svare_tiny/lr_default/params",
    "svare_tiny/lr_default/params_beyond_strict_bound",
    "fid_inception/fid/pool3", "fid_inception/fid/pool3_fp64", "fid_inception/fid/input299_crops",
    "fid_inception/fid/case_img_shift", "fid_inception/fid/scorer_given_paths",
    "clip/quick_gelu/image_embeds", "clip/quick_gelu/text_embeds", "clip/gelu_legacy_eos/logits_per_image",
    "clip/clip_score_pipeline/cosine", "clip/preprocess/300x200",
    "nudity/scores_vs_nudedetector/face_085.png",
)


def _g(value: float) -> str:
    return "0" if value == 0 else f"{value:.2g}"


def _parity_rows(names, low: dict, default: dict) -> list[list[str]]:
    rows = []
    for name in names:
        a, b = low[name], default.get(name)
        rows.append([f"`{name}`", a["what"].replace("|", "\\|"), _g(a["bound"]), _g(a["measured"]),
                     "" if b is None else _g(b["measured"])])
    return rows


def parity_block() -> str:
    low, default = result("parity"), result("parity_default_opt")
    checks_low, checks_default = low["checks"], default["checks"]
    missing = [n for n in PARITY_HEADLINE if n not in checks_low]
    if missing:
        raise KeyError(f"benchmarks/results/parity.json lacks the checks {missing}")
    header = ["check", "what", "bound", "measured (-O0)", "measured (default opt.)"]
    rest = [n for n in checks_low if n not in PARITY_HEADLINE]
    return (_table(header, _parity_rows(PARITY_HEADLINE, checks_low, checks_default)) + "\n\n"
            + f"<details><summary>All {len(checks_low)} recorded checks</summary>\n\n"
            + _table(header, _parity_rows(rest, checks_low, checks_default)) + "\n\n</details>\n\n"
            + f"Commands: `{low['command']}` and `VAREJAX_XLA_O0=0 {default['command']}`, each with "
            + "`VAREJAX_MEASURED=FILE` (" + low["fixtures"] + "). "
            + _source("benchmarks/results/parity.json", "benchmarks/results/parity_default_opt.json"))


VS_UPSTREAM_PATHS = {"forward": "teacher-forced forward", "grad": "forward + backward of the bit loss",
                     "grad_remat": "the same with per-block remat (upstream: full-block checkpointing)",
                     "svare": "one S-VARE iteration (erase + preserve pass, clip, AdamW on CA + FFN)",
                     "sample": "CFG sampling of every scale, KV cache",
                     "vae_encode": "tokenizer encode (256 px, d32 layout at width 32), raw features",
                     "vae_decode": "tokenizer decode of summed codes to images",
                     "t5_encode": "T5 encoder (Flan-T5 layout, d_model 512, 4 layers)"}


def _ms(cell: dict) -> str:
    return f"{cell['median']:.0f} ({cell['min']:.0f}-{cell['max']:.0f})"


def _ratio(cell: dict) -> str:
    return f"**{cell['median']:.2f}x** ({cell['min']:.2f}-{cell['max']:.2f})"


def vs_upstream_block() -> str:
    data = result("vs_upstream")
    ms, ratio = data["ms"], data["upstream_over_ours"]
    rows = [[VS_UPSTREAM_PATHS.get(name, name), _ms(ms["upstream_fp32"][name]), _ms(ms["ours_fp32"][name]),
             _ratio(ratio["ours_fp32"][name]), _ms(ms["ours_bf16"][name]), _ratio(ratio["ours_bf16"][name])]
            for name in ms["upstream_fp32"]]
    header = ["path", "upstream fp32 (ms)", "ours fp32 (ms)", "upstream / ours fp32", "ours bf16 compute (ms)",
              "upstream fp32 / ours bf16"]
    machine = data["machine"]
    return (_table(header, rows) + "\n\n"
            + f"Preset `{data['preset']}` with d = {data['d']}, batch {data['batch']}, text lengths "
            + f"{data['text_lengths']}, {data['scales']} scales (L = {data['L']}), our attention "
            + f"`{data['attention_impl']}`; median of {data['runs']} runs (each the median of "
            + f"{data['steps_per_run']} calls), min-max in brackets; {machine['cpus']} CPU cores, jax "
            + f"{machine['jax']}, torch {machine['torch']}. Command: `VAREJAX_UPSTREAM_INFINITY=CHECKOUT "
            + f"{data['command']}`. "
            + _source("benchmarks/results/vs_upstream.json") + "\n\n" + _rerun_line())


def _rerun_line() -> str:
    """The same command re-run later (same machine), and once more on a later session's machine: how far the
    ratios move between runs."""
    data = result("vs_upstream_rerun")["upstream_over_ours"]["ours_fp32"]
    third = result("vs_upstream_rerun2")
    first = result("vs_upstream")["upstream_over_ours"]["ours_fp32"]["grad"]["median"]
    cells = lambda d: ", ".join(f"{name} {_ratio(cell)}" for name, cell in d.items())
    later = third["upstream_over_ours"]["ours_fp32"]
    return ("A re-run of the same command later on the same machine (upstream / ours fp32): " + cells(data)
            + ". On a later session's machine (2 cores, " + f"torch {third['machine']['torch']}): "
            + cells(later) + f" (command: `{third['command']}`). Forward + backward: {first:.2f}x, "
            + f"{data['grad']['median']:.2f}x and {later['grad']['median']:.2f}x in the three runs; read each ratio "
            + "with all three. "
            + _source("benchmarks/results/vs_upstream_rerun.json", "benchmarks/results/vs_upstream_rerun2.json"))


def compile_time_block() -> str:
    data = result("compile_time")
    rows = [[row["depth"], f"{row['unrolled']['lower_s']:.2f} + {row['unrolled']['compile_s']:.2f}",
             f"{row['scanned']['lower_s']:.2f} + {row['scanned']['compile_s']:.2f}",
             f"**{row['unrolled_over_scanned']:.2f}x**"] for row in data["depths"]]
    header = ["depth", "unrolled: trace + compile (s)", "scan_blocks: trace + compile (s)", "unrolled / scanned"]
    return (_table(header, rows) + "\n\n"
            + f"Gradient of the bit loss with remat={data['remat']}, preset `{data['preset']}` (width 256), "
            + f"batch {data['batch']}, L = {data['L']}; the minimum over {data['runs']} runs, persistent cache off; "
            + f"{data['machine']['cpus']} CPU cores, jax {data['machine']['jax']}. Command: `{data['command']}`. "
            + _source("benchmarks/results/compile_time.json"))


def profile_step_block() -> str:
    """The gradient's cost with and without the residual-gradient boundaries, and where its time goes."""
    data = result("profile_step")
    cost, timeline = data["programs"][next(iter(data["programs"]))], data["timeline"]
    on, off, fwd = timeline["gradient_boundaries_on"], timeline["gradient_boundaries_off"], timeline["forward"]
    kind = lambda t, k: t["kinds"].get(k, {"ms": 0.0})["ms"]
    spread = lambda t: f"{min(t['total_ms_runs']):.0f}-{max(t['total_ms_runs']):.0f}"
    return (f"Gradient with / without the boundaries: thunk time **{on['total_ms']:.1f} / {off['total_ms']:.1f} ms** "
            + f"per call (median of {data['timeline_runs']} runs; min-max {spread(on)} / {spread(off)} ms), "
            + f"layout-copy fusions (`copy_bitcast_fusion`) {kind(on, 'copy_bitcast_fusion'):.1f} / "
            + f"{kind(off, 'copy_bitcast_fusion'):.1f} ms, XLA's GB accessed {cost['gradient']['gb_accessed']:.2f} / "
            + f"{cost['gradient_boundaries_off']['gb_accessed']:.2f}. The gradient takes "
            + f"{on['total_ms'] / fwd['total_ms']:.1f}x the forward's thunk time ({fwd['total_ms']:.1f} ms); of its "
            + f"{on['total_ms']:.0f} ms, XNNPACK dots with their fused epilogues (`ynn_fusion`) take "
            + f"{kind(on, 'ynn_fusion'):.0f} ms, Eigen dots (`dot`, the attention backward's) "
            + f"{kind(on, 'dot'):.0f} ms, the remaining layout copies {kind(on, 'copy_bitcast_fusion'):.0f} ms, and "
            + f"many small elementwise fusions the rest ({data['timeline_calls']} "
            + f"profiled calls per run, jax {data['jax']}). Command: `{data['command']}`. "
            + _source("benchmarks/results/profile_step.json"))


def matmul_peak_block() -> str:
    """One matmul's GFLOP/s, JAX against torch, fp32 and bf16 (benchmarks/matmul_peak.py)."""
    data = result("matmul_peak")
    sides = ["jax"] + (["torch"] if "torch" in data else [])
    cell = lambda c: f"{c['gflops']:.0f} ({c['min']:.0f}-{c['max']:.0f})"
    rows = [["x".join(str(d) for d in row["shape"]),
             *(cell(row[f"{side}_{dtype}"]) for side in sides for dtype in ("float32", "bfloat16")),
             *(f"{row[f'{side}_bfloat16']['gflops'] / row[f'{side}_float32']['gflops']:.2f}x" for side in sides)]
            for row in data["rows"]]
    header = ["M x K x N", *(f"{side} {dtype}" for side in sides for dtype in ("fp32", "bf16")),
              *(f"{side} bf16 / fp32" for side in sides)]
    cpu = data["cpu"]
    return (_table(header, rows) + "\n\n"
            + f"GFLOP/s, median of {data['runs']} runs (each the median of {data['calls']} calls), min-max in "
            + f"brackets; {cpu['model']} ({cpu['cores_seen_by_jax']} cores; AVX512-BF16 "
            + f"{'yes' if cpu['avx512_bf16'] else 'no'}, AMX {'yes' if cpu['amx_bf16'] else 'no'}), jax {data['jax']}"
            + (f", torch {data['torch']}" if "torch" in data else "") + f". Command: `{data['command']}`. "
            + _source("benchmarks/results/matmul_peak.json"))


BLOCKS: dict[str, Callable[[], str]] = {
    "vs_upstream": vs_upstream_block,
    "profile_step": profile_step_block,
    "matmul_peak": matmul_peak_block,
    "compile_time": compile_time_block,
    "parity": parity_block,
    "toy_world": world_block,
    "toy_base_values": base_values_block,
    "toy_main": main_job_block,
    "toy_attacks": attacks_block,
    "toy_configs": configs_block,
    "toy_ablation": ablation_block,
    "sweep": sweep_block,
    "sweep_toy": sweep_toy_block,
    "sweep_toy_main": sweep_toy_main_block,
}


def render(text: str) -> str:
    """README text with every figure block re-rendered from its source file."""
    seen = set()

    def fill(match: re.Match) -> str:
        name = match["name"]
        if name not in BLOCKS:
            raise KeyError(f"README.md has a figure block {name!r} that benchmarks/readme_figures.py does not know")
        seen.add(name)
        return match.group(1) + BLOCKS[name]() + "\n" + match.group(4)

    out = BLOCK.sub(fill, text)
    missing = sorted(set(BLOCKS) - seen)
    if missing:
        raise KeyError(f"README.md lacks the figure blocks {missing}")
    return out


def collect(spec: str) -> None:
    """`NAME=PATH`: copies a JSON file a run wrote into benchmarks/results/NAME.json, verbatim."""
    name, _, path = spec.partition("=")
    if not name or not path or not re.fullmatch(r"[a-z0-9_]+", name):
        raise SystemExit(f"--collect expects NAME=PATH with NAME in [a-z0-9_], got {spec!r}")
    source = Path(path)
    json.loads(source.read_text())  # refuse a file that is not JSON before it replaces a good one
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, RESULTS / f"{name}.json")
    print(f"collected {source} -> {RESULTS / f'{name}.json'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md differs from the files")
    parser.add_argument("--collect", action="append", default=[], metavar="NAME=PATH")
    args = parser.parse_args(argv)
    for spec in args.collect:
        collect(spec)
    text = README.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print("README.md figures are stale: run `python benchmarks/readme_figures.py`", file=sys.stderr)
            return 1
        print("README.md figures match their source files")
        return 0
    README.write_text(new)
    print("README.md figures rewritten" if new != text else "README.md figures already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
