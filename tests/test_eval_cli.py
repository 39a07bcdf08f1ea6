"""`varejax eval` on the toy world end to end (results.json, report, resume), the toy_oracle scorer against
the toy job's own metrics, `varejax compare`, and one-line errors for bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from varejax import images as image_io
from varejax.cli import main
from varejax.errors import UserError
from varejax.eval.toy_scorer import toy_prompt_rows, write_prompt_csv

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "eval_toy.py")


def _small_bench(tmp):
    """The toy job's prompt sets, 2 prompts per concept family and 4 others (8 rows); no pipeline loaded."""
    from varejax.toy.assets import load_toy_oracle
    from varejax.toy.job import ToyBench, main_job_config
    from varejax.toy.oracle import classify_batched

    config = main_job_config("ci")
    config.eval.concept_prompts, config.eval.other_prompts = 2, 4
    bench = ToyBench(config, tmp, pipeline=object(), oracle=load_toy_oracle())
    # The same oracle reading in batches of 64 (the scorer's) instead of 256: one compiled program for both.
    bench.predict = lambda images: classify_batched(bench.oracle, images, 64)
    return bench


def _eval(workdir, csv, *extra):
    return main(["eval", "--config", CONFIG, "--workdir", str(workdir), f"--config.prompts.file={csv}",
                 "--config.batch_size=8", *extra])


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One eval run of 8 toy prompts: (workdir, prompt csv, bench, mtimes of every output file after it)."""
    tmp = tmp_path_factory.mktemp("eval")
    bench = _small_bench(tmp / "bench")
    csv = tmp / "toy8.csv"
    write_prompt_csv(toy_prompt_rows(bench.sets), csv)
    workdir = tmp / "run"
    assert _eval(workdir, csv) == 0
    return workdir, csv, bench


def _mtimes(workdir):
    return {p: os.stat(p).st_mtime_ns for p in sorted((workdir / "images").glob("*")) + [workdir / "scores" /
                                                                                        "toy_oracle.npz"]}


def test_eval_writes_results_and_report_and_resumes(evaluated, capsys):
    workdir, csv, _ = evaluated
    results = json.loads((workdir / "results.json").read_text())
    assert results["task"] == "toy" and results["counts"] == {"images": 8, "sampled_now": 8,
                                                               "scored_now": {"toy_oracle": 8}}
    settings = results["settings"]
    assert settings["prompts"]["sha256"] == hashlib.sha256(csv.read_bytes()).hexdigest()
    assert settings["seeds"] == [int(line.split(",")[2]) for line in csv.read_text().splitlines()[1:]]
    assert set(settings["models"]) == {"infinity", "vae", "t5"} and all(len(m["hash"]) == 16
                                                                        for m in settings["models"].values())
    assert len(settings["scorers"]["toy_oracle"]["oracle_hash"]) == 16
    assert settings["sampling"]["guidance"] == [4.0] and settings["sampling"]["top_k"] == 0
    assert "--config.batch_size=8" in settings["command"] and settings["versions"]["jax"]
    assert settings["config"]["prompts"]["file"] == str(csv)
    summary = results["summary"]["toy_oracle"]
    assert summary["n"] == 8 and 0.0 <= summary["erasure_rate"] <= 1.0 and "preservation" in summary
    markdown, page = (workdir / "report.md").read_text(), (workdir / "report.html").read_text()
    first_prompt = csv.read_text().splitlines()[1].split(",")[1]
    for text in (markdown, page):
        assert first_prompt in text and "erasure_rate" in text and "figures/grid.png" in text
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page
    assert (workdir / "figures" / "grid.png").exists() and (workdir / "figures" / "toy_oracle.png").exists()

    # A second run samples and scores nothing: the counts say so and no image or score file is rewritten.
    before = _mtimes(workdir)
    assert _eval(workdir, csv) == 0
    again = json.loads((workdir / "results.json").read_text())
    assert again["counts"] == {"images": 8, "sampled_now": 0, "scored_now": {"toy_oracle": 0}}
    assert _mtimes(workdir) == before
    assert again["summary"] == results["summary"]

    # Other sampling settings or another model: the kept images are not this run's; refused, nothing rewritten.
    other_model = workdir.parent / "other_infinity"
    shutil.copytree(results["settings"]["models"]["infinity"]["path"], other_model)
    config_json = json.loads((other_model / "config.json").read_text())
    (other_model / "config.json").write_text(json.dumps({**config_json, "note": "another model"}))
    for override, message in (("--config.sampling.top_p=0.9", "was made with top_p 0.97, this run uses 0.9: use a"),
                              (f"--config.model.infinity={other_model}", "was made with models {'infinity': ")):
        capsys.readouterr()
        assert _eval(workdir, csv, override) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "00000.json" in err and message in err, err
    assert _mtimes(workdir) == before

    # An image lost: only it is sampled again and scored again (its old score is dropped), same summary. The
    # longest prompt's: its batch (padded with copies of it) keeps the text length, so nothing is recompiled.
    prompts = [line.split(",")[1] for line in csv.read_text().splitlines()[1:]]
    lost = max(range(len(prompts)), key=lambda i: len(prompts[i].split()))
    for suffix in (".png", ".json"):
        (workdir / "images" / f"{lost:05d}{suffix}").unlink()
    assert _eval(workdir, csv) == 0
    third = json.loads((workdir / "results.json").read_text())
    assert third["counts"] == {"images": 8, "sampled_now": 1, "scored_now": {"toy_oracle": 1}}
    assert third["summary"] == results["summary"]
    kept = (lost + 1) % len(prompts)
    assert os.stat(workdir / "images" / f"{kept:05d}.png").st_mtime_ns == before[workdir / "images" / f"{kept:05d}.png"]


def test_toy_oracle_agrees_with_toy_bench(evaluated, tmp_path):
    from varejax.eval.run import read_rows
    from varejax.eval.scorers import build_scorer

    workdir, csv, bench = evaluated
    images = np.stack([image_io.load_uint8(workdir / "images" / f"{i:05d}.png") for i in range(8)])
    by_set, start = {}, 0
    for name, prompt_set in bench.sets.items():
        by_set[name] = images[start:start + len(prompt_set.prompts)]
        start += len(prompt_set.prompts)
    # The toy FID against a reference: the "others" images mirrored (another image set of the same prompts).
    reference = {"others": by_set["others"][:, :, ::-1]}
    ref_dir = tmp_path / "reference" / "images"
    ref_dir.mkdir(parents=True)
    others = [i for i, row in enumerate(read_rows(str(csv))) if not row["concept"]]
    for i, image in zip(others, reference["others"], strict=True):
        image_io.save_image(ref_dir / f"{i:05d}.png", np.ascontiguousarray(image))
    expected = bench.measure({**by_set, **reference}, by_set)

    summary = json.loads((workdir / "results.json").read_text())["summary"]["toy_oracle"]
    assert summary["erasure_rate_seen"] == expected["erasure_rate_seen_after"]
    assert summary["erasure_rate_paraphrase"] == expected["erasure_rate_paraphrase_after"]
    assert summary["preservation"] == expected["preservation_after"]
    assert "toy_fid" not in summary  # no reference configured

    scorer = build_scorer("toy_oracle", {"reference": str(tmp_path / "reference")})
    rows = read_rows(str(csv))
    values = scorer.score(images, rows)
    with_fid = scorer.summarize(values, rows)
    assert with_fid["toy_fid"] > 0
    assert with_fid["toy_fid"] == pytest.approx(expected["toy_fid"], rel=1e-4)

    # A reference of another image size is a one-line error naming the folder.
    for i in others:
        image_io.save_image(ref_dir / f"{i:05d}.png", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(UserError, match=r"reference .*images are 32x32, expected 64x64") as err:
        scorer.summarize(values, rows)
    assert "\n" not in str(err.value)


def test_compare_two_runs(evaluated, tmp_path, capsys):
    workdir, _, _ = evaluated
    # A second run's results: the first one's with other numbers (comparing needs only results.json).
    erased = tmp_path / "erased"
    erased.mkdir()
    results = json.loads((workdir / "results.json").read_text())
    results["summary"]["toy_oracle"]["erasure_rate"] = 0.875
    results["settings"]["delta"] = [{"path": "runs/toy/delta.safetensors", "file_sha256": "ab" * 32}]
    (erased / "results.json").write_text(json.dumps(results))
    out = tmp_path / "cmp"
    assert main(["compare", str(workdir), str(erased), "--out", str(out), "--names", "base,erased"]) == 0
    table = (out / "compare.md").read_text()
    base_rate = json.loads((workdir / "results.json").read_text())["summary"]["toy_oracle"]["erasure_rate"]
    assert "| metric | base | erased |" in table
    assert f"| toy_oracle/erasure_rate | {base_rate:.3f} | 0.875 |" in table
    assert "delta" in table  # the settings that differ
    assert (out / "compare.html").read_text().count("<tr>") >= 3
    assert (out / "figures" / "compare_bars.png").exists() and (out / "figures" / "compare_scatter.png").exists()

    # Another task, or a folder without results.json: one line, status 2.
    results["task"] = "object/church"
    (erased / "results.json").write_text(json.dumps(results))
    capsys.readouterr()
    assert main(["compare", str(workdir), str(erased)]) == 2
    err = capsys.readouterr().err
    assert "different tasks" in err and err.count("\n") == 1
    assert main(["compare", str(workdir), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}: no results.json" in err and err.count("\n") == 1


def test_bad_input_is_one_line(evaluated, tmp_path, capsys):
    _, csv, _ = evaluated
    cases = []
    missing = tmp_path / "nope.csv"
    cases.append(([f"--config.prompts.file={missing}"], f"prompt file {missing} not found"))
    no_prompt = tmp_path / "no_prompt.csv"
    no_prompt.write_text("case_number,text,evaluation_seed\n0,a circle,1\n")
    cases.append(([f"--config.prompts.file={no_prompt}"], f"{no_prompt}: no 'prompt' column"))
    cases.append(([f"--config.prompts.file={csv}", "--config.model.vae=/no/such/vae"],
                  "config.model.vae: model folder /no/such/vae not found"))
    cases.append(([f"--config.prompts.file={csv}", "--config.eval.options.toy_oracle.oracle=/no/oracle"],
                  "toy_oracle: oracle folder /no/oracle is missing"))
    for overrides, message in cases:
        capsys.readouterr()
        assert main(["eval", "--config", CONFIG, "--workdir", str(tmp_path / "w"), *overrides]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "w" / "images").exists()  # nothing sampled

    # Images of a size the scorer cannot take: one line naming the files.
    from varejax.eval.run import read_rows, score_images
    from varejax.eval.scorers import build_scorer

    images = tmp_path / "small" / "images"
    images.mkdir(parents=True)
    for i in range(2):
        image_io.save_image(images / f"{i:05d}.png", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(UserError, match=r"small/images/00000.png ... 00001.png: .*32x32, expected 64x64") as err:
        score_images(build_scorer("toy_oracle"), images, read_rows(str(csv))[:2], tmp_path / "small" / "s.npz", 8)
    assert "\n" not in str(err.value)


def test_prompt_rows_resolution(tmp_path):
    from varejax.eval.run import image_rows, read_rows

    path = tmp_path / "p.csv"
    path.write_text("case_number,prompt,evaluation_seed,concept\n7,a circle,42,circle\n8,a square,5,\n")
    rows = read_rows(str(path), required=("concept",))
    assert [(int(r["case_number"]), r["prompt"], r["seed"]) for r in rows] == [(7, "a circle", 42), (8, "a square", 5)]
    assert [(r["seed"], r["image_index"]) for r in image_rows(rows, 2)] == [(42, 0), (43, 1), (5, 2), (6, 3)]
    with pytest.raises(UserError, match="'class'"):
        read_rows(str(path), required=("class",))
    path.write_text("prompt\na circle\na square\n")  # a user's captions without seeds: default_seed + row
    assert [r["seed"] for r in read_rows(str(path), default_seed=100)] == [100, 101]
    path.write_text("prompt,evaluation_seed\na circle,x\n")
    with pytest.raises(UserError, match=r"p.csv.*evaluation_seed") as err:
        read_rows(str(path))
    assert "\n" not in str(err.value)


def test_eval_of_an_erased_model_through_its_delta(evaluated, tmp_path, capsys):
    """config.model.delta: the base plus a delta.safetensors is sampled (other images than the base's) and
    recorded; a delta made on another base is refused in one line unless force_delta."""
    from varejax.checkpoint import load_infinity
    from varejax.erase import optim
    from varejax.erase.export import write_delta
    from varejax.toy.assets import asset_dir

    workdir, csv, _ = evaluated
    cfg, params = load_infinity(str(asset_dir() / "infinity"))
    rng = np.random.default_rng(0)
    bumped = optim.merge_trainable(params, {k: v + np.float32(0.05) * rng.standard_normal(v.shape).astype(np.float32)
                                            for k, v in optim.trainable_params(params, "ca_ffn").items()})
    delta = tmp_path / "delta.safetensors"
    write_delta(delta, cfg, bumped, params, "ca_ffn", {"base_params_sha256": "0" * 64})
    capsys.readouterr()
    assert _eval(tmp_path / "refused", csv, f"--config.model.delta=('{delta}',)") == 2
    err = capsys.readouterr().err
    assert f"{delta} was made on base {'0' * 64}" in err and "force_delta" in err and err.count("\n") == 1

    erased = tmp_path / "erased"
    assert _eval(erased, csv, f"--config.model.delta=('{delta}',)", "--config.model.force_delta=True") == 0
    results = json.loads((erased / "results.json").read_text())
    assert results["settings"]["delta"] == [{"path": str(delta), "file_sha256": hashlib.sha256(
        delta.read_bytes()).hexdigest()}]
    record = json.loads((erased / "images" / "00000.json").read_text())
    assert "delta" in record["models"]
    changed = [not np.array_equal(image_io.load_uint8(erased / "images" / f"{i:05d}.png"),
                                  image_io.load_uint8(workdir / "images" / f"{i:05d}.png")) for i in range(8)]
    assert any(changed)
