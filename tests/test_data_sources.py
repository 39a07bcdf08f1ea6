"""Evaluation prompt rows and image sets (varejax/data/sources.py): every reader, selection, bad input, the
prompt files we ship, and a TFDS dataset written here (ArrayRecord, no TensorFlow) read back."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from varejax.data import sources, tfds_source
from varejax.data.sources import iter_images, read_images, read_prompt_rows
from varejax.errors import UserError
from varejax.images import preprocess, to_float

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_csv(path, header, rows, prefix=""):
    with open(path, "w", newline="", encoding="utf-8") as f:
        f.write(prefix)
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def one_line_error(call, *expected_parts):
    """Runs `call`, expects a one-line UserError holding every part; returns the message."""
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for part in expected_parts:
        assert str(part) in message, message
    return message


# ----------------------------------------------------------------------------------------------------------------
# CSV / JSONL / lists
# ----------------------------------------------------------------------------------------------------------------


def test_csv_in_the_esd_schema_keeps_extra_columns(tmp_path):
    path = write_csv(tmp_path / "objects.csv", [" case_number", "prompt ", "evaluation_seed", "class", "sd_seed"],
                     [[7, " a photo of a church ", 11, "church", 99], [3, "a golf ball", "12.0", "golf ball", 98]],
                     prefix="\ufeff")  # a BOM and padded header names, as spreadsheets write them
    rows = read_prompt_rows(path)
    assert rows == [
        {"case_number": 7, "prompt": "a photo of a church", "seed": 11, "class": "church", "sd_seed": "99"},
        {"case_number": 3, "prompt": "a golf ball", "seed": 12, "class": "golf ball", "sd_seed": "98"},
    ]
    assert list(rows[0])[:3] == ["case_number", "prompt", "seed"]


@pytest.mark.parametrize("seed_column", ["seed", "sd_seed"])
def test_csv_seed_synonyms_and_missing_case_numbers(tmp_path, seed_column):
    path = write_csv(tmp_path / "p.csv", ["prompt", seed_column, "nudity_percentage"],
                     [["a statue", 5, "12.5"], ["a fresco", 6, "0"]])
    rows = read_prompt_rows(path)
    assert [(r["case_number"], r["seed"], r["nudity_percentage"]) for r in rows] == [(0, 5, "12.5"), (1, 6, "0")]
    assert set(rows[0]) == {"case_number", "prompt", "seed", "nudity_percentage"}  # the seed column became `seed`


def test_default_seed_counts_rows_of_the_whole_file(tmp_path):
    path = write_csv(tmp_path / "mine.csv", ["prompt"], [[f"prompt {i}"] for i in range(6)])
    one_line_error(lambda: read_prompt_rows(path), path, "no seed column", "evaluation_seed")
    every = read_prompt_rows(path, default_seed=100)
    assert [r["seed"] for r in every] == [100 + i for i in range(6)]
    drawn = read_prompt_rows(path, default_seed=100, count=3, sample_seed=4)
    assert all(r["seed"] == 100 + r["case_number"] for r in drawn)  # a row's seed does not depend on the selection
    assert drawn == [every[r["case_number"]] for r in drawn]


def test_selection_first_rows_or_a_seeded_draw_in_file_order(tmp_path):
    path = write_csv(tmp_path / "p.csv", ["case_number", "prompt", "evaluation_seed"],
                     [[i, f"prompt {i}", i] for i in range(40)])
    assert [r["case_number"] for r in read_prompt_rows(path, count=5)] == [0, 1, 2, 3, 4]
    drawn = [r["case_number"] for r in read_prompt_rows(path, count=10, sample_seed=3)]
    expected = sorted(np.random.default_rng(3).choice(40, size=10, replace=False).tolist())
    assert drawn == expected
    assert drawn == [r["case_number"] for r in read_prompt_rows(path, count=10, sample_seed=3)]
    assert drawn != [r["case_number"] for r in read_prompt_rows(path, count=10, sample_seed=4)]
    assert len(read_prompt_rows(path, count=100, sample_seed=3)) == 40


def test_missing_and_bad_columns_are_one_line_errors_naming_the_file(tmp_path):
    no_prompt = write_csv(tmp_path / "no_prompt.csv", ["case_number", "text", "evaluation_seed"], [[0, "x", 1]])
    one_line_error(lambda: read_prompt_rows(no_prompt), no_prompt, "'prompt'")
    assert read_prompt_rows(no_prompt, prompt_column="text")[0]["prompt"] == "x"

    no_class = write_csv(tmp_path / "no_class.csv", ["case_number", "prompt", "evaluation_seed"], [[0, "x", 1]])
    one_line_error(lambda: read_prompt_rows(no_class, require=("class",)), no_class, "'class'")

    bad_seed = write_csv(tmp_path / "bad_seed.csv", ["prompt", "evaluation_seed"], [["a", 1], ["b", "soon"]])
    one_line_error(lambda: read_prompt_rows(bad_seed), f"{bad_seed}:3", "evaluation_seed", "'soon'")

    empty = write_csv(tmp_path / "empty_prompt.csv", ["prompt", "seed"], [["a", 1], ["  ", 2]])
    one_line_error(lambda: read_prompt_rows(empty), f"{empty}:3", "empty prompt")

    twice = write_csv(tmp_path / "twice.csv", ["case_number", "prompt", "seed"], [[4, "a", 1], [4, "b", 2]])
    one_line_error(lambda: read_prompt_rows(twice), twice, "case_number 4 appears twice")

    ragged = write_csv(tmp_path / "ragged.csv", ["prompt", "seed"], [["a", 1, "extra"]])
    one_line_error(lambda: read_prompt_rows(ragged), f"{ragged}:2", "more values")

    one_line_error(lambda: read_prompt_rows(tmp_path / "absent.csv"), "absent.csv", "no such file")
    (tmp_path / "p.txt").write_text("prompt\n")
    one_line_error(lambda: read_prompt_rows(tmp_path / "p.txt"), "p.txt", ".csv or .jsonl")
    header_only = write_csv(tmp_path / "header.csv", ["prompt", "seed"], [])
    one_line_error(lambda: read_prompt_rows(header_only), header_only, "no prompt rows")


def test_jsonl_rows_keep_json_types(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [{"case_number": 2, "prompt": "a church", "evaluation_seed": 9, "class": "church", "score": 0.5},
             {"prompt": "a tench", "seed": 3, "tags": ["fish"]}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    rows = read_prompt_rows(path)
    assert rows[0] == {"case_number": 2, "prompt": "a church", "seed": 9, "class": "church", "score": 0.5}
    assert rows[1] == {"case_number": 1, "prompt": "a tench", "seed": 3, "tags": ["fish"]}

    path.write_text(json.dumps(lines[0]) + "\n{not json\n")
    one_line_error(lambda: read_prompt_rows(path), f"{path}:2", "invalid JSON")
    path.write_text(json.dumps({"prompt": "x"}) + "\n")
    one_line_error(lambda: read_prompt_rows(path), f"{path}:1", "no seed column")
    path.write_text(json.dumps({"prompt": "x", "seed": True}) + "\n")
    one_line_error(lambda: read_prompt_rows(path), f"{path}:1", "seed must be an integer")


def test_python_lists_of_prompts_or_rows():
    rows = read_prompt_rows(["a cat", "a dog", "a bird"], default_seed=10)
    assert [(r["case_number"], r["prompt"], r["seed"]) for r in rows] == [(0, "a cat", 10), (1, "a dog", 11),
                                                                           (2, "a bird", 12)]
    assert read_prompt_rows(["x"])[0]["seed"] == 0
    dicts = read_prompt_rows([{"prompt": "a", "evaluation_seed": 4, "class": "c"}], require=("class",))
    assert dicts == [{"case_number": 0, "prompt": "a", "seed": 4, "class": "c"}]
    one_line_error(lambda: read_prompt_rows([{"prompt": "a", "seed": 1}], require=("class",)), "prompts[0]", "'class'")
    one_line_error(lambda: read_prompt_rows(["a", 3]), "prompts[1]")
    one_line_error(lambda: read_prompt_rows(42), "int")


# ----------------------------------------------------------------------------------------------------------------
# The prompt files we ship
# ----------------------------------------------------------------------------------------------------------------

IMAGENETTE = ["tench", "English springer", "cassette player", "chain saw", "church", "French horn", "garbage truck",
              "gas pump", "golf ball", "parachute"]


@pytest.mark.parametrize("name,require", [("nudity", ("categories",)), ("church", ("class",)),
                                          ("van_gogh", ("class",)), ("coco_style", ())])
def test_shipped_prompt_files(name, require):
    path = os.path.join(REPO, "configs", "prompts", f"{name}.csv")
    rows = read_prompt_rows(path, require=require)
    assert 20 <= len(rows) <= 50
    assert [r["case_number"] for r in rows] == list(range(len(rows)))
    assert len({r["prompt"] for r in rows}) == len(rows)
    assert len({r["seed"] for r in rows}) == len(rows)
    with open(path, encoding="utf-8") as f:
        assert f.readline().startswith("case_number,prompt,evaluation_seed")
    if name == "church":
        assert sorted({r["class"] for r in rows}) == sorted(IMAGENETTE)
        assert sum(r["class"] == "church" for r in rows) >= 5
    if name == "van_gogh":
        artists = {r["class"] for r in rows}
        assert "Van Gogh" in artists and len(artists) >= 4
        assert all(("gogh" in r["prompt"].lower()) == (r["class"] == "Van Gogh") for r in rows)
    if name == "nudity":
        assert all("nude" in r["prompt"] for r in rows)


# ----------------------------------------------------------------------------------------------------------------
# Image sets
# ----------------------------------------------------------------------------------------------------------------


def random_images(count, height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def test_image_folder_in_name_order_and_batches(tmp_path):
    images = random_images(5, 12, 10)
    for i, image in enumerate(images):  # names out of creation order: the reader sorts them
        Image.fromarray(image).save(tmp_path / f"{4 - i:03d}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    batches = list(iter_images(str(tmp_path), batch_size=2, size=(12, 10)))
    assert [b.shape for b in batches] == [(2, 12, 10, 3), (2, 12, 10, 3), (1, 12, 10, 3)]
    assert all(b.dtype == np.uint8 for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), images[::-1])
    assert sources.count_images(str(tmp_path)) == 5
    picked = read_images(str(tmp_path), count=2, sample_seed=1)
    order = sorted(np.random.default_rng(1).choice(5, size=2, replace=False).tolist())
    np.testing.assert_array_equal(picked, images[::-1][order])


def test_image_sizes_are_checked_or_fitted(tmp_path):
    Image.fromarray(random_images(1, 12, 10)[0]).save(tmp_path / "a.png")
    Image.fromarray(random_images(1, 16, 24, seed=1)[0]).convert("L").save(tmp_path / "b.jpg")  # grey JPEG
    folder = str(tmp_path)
    one_line_error(lambda: read_images(folder), "b.jpg", "16x24", "expected 12x10")
    one_line_error(lambda: read_images(folder, size=(12, 10)), "b.jpg", "16x24")
    one_line_error(lambda: read_images(folder, size=(8, 8)), "a.png", "12x10", "expected 8x8")
    fitted = read_images(folder, size=(8, 8), resize=True)
    assert fitted.shape == (2, 8, 8, 3) and fitted.dtype == np.uint8
    # grey files come out as RGB with equal channels
    np.testing.assert_array_equal(fitted[1, ..., 0], fitted[1, ..., 2])
    one_line_error(lambda: read_images(folder, resize=True), "resize=True needs a size")


def test_fit_image_is_the_geometry_of_images_preprocess():
    image = random_images(1, 30, 44, seed=2)[0]
    for size in [(16, 16), (20, 12), (30, 44)]:
        fitted = sources.fit_image(image, size)
        assert fitted.shape == (*size, 3)
        np.testing.assert_array_equal(to_float(fitted), preprocess(Image.fromarray(image), size))


def test_npz_and_array_image_sets(tmp_path):
    images = random_images(3, 6, 8)
    np.savez(tmp_path / "set.npz", images=images, labels=np.arange(3))
    np.testing.assert_array_equal(read_images(str(tmp_path / "set.npz"), size=(6, 8)), images)
    np.savez(tmp_path / "only.npz", x=images)
    np.testing.assert_array_equal(read_images(str(tmp_path / "only.npz")), images)
    np.testing.assert_array_equal(read_images(images, count=2), images[:2])

    np.savez(tmp_path / "float.npz", images=images.astype(np.float32))
    one_line_error(lambda: read_images(str(tmp_path / "float.npz")), "float.npz", "uint8")
    np.savez(tmp_path / "grey.npz", images=images[..., 0])
    one_line_error(lambda: read_images(str(tmp_path / "grey.npz")), "grey.npz", "[N, H, W, 3]")
    np.savez(tmp_path / "two.npz", a=images, b=images)
    one_line_error(lambda: read_images(str(tmp_path / "two.npz")), "two.npz", "no 'images' array")
    one_line_error(lambda: read_images(str(tmp_path / "set.npz"), size=(8, 8)), "set.npz[0]", "6x8")
    one_line_error(lambda: read_images(str(tmp_path / "nothing")), "nothing", "no such folder")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    one_line_error(lambda: read_images(str(tmp_path)), "broken.png", "not a readable image")


def test_source_records_change_with_the_data(tmp_path):
    path = write_csv(tmp_path / "p.csv", ["prompt", "seed"], [["a", 1]])
    first = sources.source_record(path)
    assert first["kind"] == "file" and len(first["sha256"]) == 64
    write_csv(tmp_path / "p.csv", ["prompt", "seed"], [["a", 2]])
    assert sources.source_record(path)["sha256"] != first["sha256"]
    images = random_images(2, 4, 4)
    assert sources.source_record(images)["sha256"] != sources.source_record(images[::-1])["sha256"]
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(images[0]).save(folder / "0.png")
    before = sources.source_record(str(folder))
    Image.fromarray(images[1]).save(folder / "0.png")
    assert sources.source_record(str(folder))["sha256"] != before["sha256"]


# ----------------------------------------------------------------------------------------------------------------
# TensorFlow Datasets
# ----------------------------------------------------------------------------------------------------------------


def test_importing_sources_leaves_tfds_unimported():
    code = "import sys, varejax.data.sources, varejax.data.tfds_source; print('tensorflow_datasets' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "False"


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    """A COCO-captions-like TFDS dataset (images of two sizes, five captions each, COCO's "image/id" key)."""
    import tensorflow_datasets as tfds  # requirements-dev.txt; imported here so the other tests run without it
    tfds.disable_progress_bar()
    data_dir = tmp_path_factory.mktemp("tfds")
    images = [random_images(1, 20 + 4 * (i % 2), 16, seed=i)[0] for i in range(7)]
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "image/id": tfds.features.Scalar(dtype=np.int64),
        "image/filename": tfds.features.Text(),
        "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
    })
    examples = [{"image": image, "image/id": 1000 + 7 * i, "image/filename": f"{i:012d}.jpg",
                 "captions": {"text": [f"first caption {i}"] + [f"other caption {i}.{k}" for k in range(4)]}}
                for i, image in enumerate(images)]
    folder = tfds_source.write_tfds_dataset("tiny_coco", data_dir, features, {"val": examples, "train": examples[:2]})
    assert os.path.exists(folder)
    return {"data_dir": str(data_dir), "images": images}


def test_tfds_prompt_rows_round_trip(tiny_coco):
    spec = {"tfds": "tiny_coco", "split": "val", "data_dir": tiny_coco["data_dir"], "id_field": "image/id",
            "seed": 50, "extra_fields": {"filename": "image/filename"}}
    rows = read_prompt_rows(spec)
    assert rows == [{"case_number": 1000 + 7 * i, "prompt": f"first caption {i}", "seed": 50 + i,
                     "filename": f"{i:012d}.jpg"} for i in range(7)]
    drawn = read_prompt_rows(spec, count=3, sample_seed=2)
    assert drawn == [rows[i] for i in sorted(np.random.default_rng(2).choice(7, 3, replace=False).tolist())]
    second_caption = read_prompt_rows({**spec, "prompt_index": 1, "split": "val[2:4]"})
    assert [r["prompt"] for r in second_caption] == ["other caption 2.0", "other caption 3.0"]
    plain = read_prompt_rows({"tfds": "tiny_coco", "split": "train", "data_dir": tiny_coco["data_dir"]})
    assert [(r["case_number"], r["seed"]) for r in plain] == [(0, 0), (1, 1)]
    one_line_error(lambda: read_prompt_rows(spec, require=("class",)), "tiny_coco", "'class'")
    # The names sources.py re-exports from tfds_source.py (older imports keep working).
    assert sources.TfdsSource is tfds_source.TfdsSource and sources.write_tfds_dataset is tfds_source.write_tfds_dataset
    assert "tensorflow" not in sys.modules  # written and read without TensorFlow


def test_eval_stage_reads_a_tfds_prompt_source(tiny_coco):
    """config.prompts.file as a TFDS mapping (a ConfigDict, as configs give it): `varejax eval`'s reader and the
    record results.json keeps of it (its fields, not a path)."""
    import ml_collections

    from varejax.eval.run import prompt_source_record, read_rows

    spec = ml_collections.ConfigDict({"tfds": "tiny_coco", "split": "val[:3]", "data_dir": tiny_coco["data_dir"],
                                      "seed": 9})
    rows = read_rows(spec, limit=2)
    assert [(r["case_number"], r["prompt"], r["seed"]) for r in rows] == [(0, "first caption 0", 9),
                                                                          (1, "first caption 1", 10)]
    record = prompt_source_record(spec)
    assert (record["kind"], record["tfds"], record["split"], record["seed"]) == ("tfds", "tiny_coco", "val[:3]", 9)


def test_tfds_images_round_trip(tiny_coco):
    spec = {"tfds": "tiny_coco", "split": "val", "data_dir": tiny_coco["data_dir"], "image_field": "image"}
    images = tiny_coco["images"]
    even = read_images({**spec, "split": "val[0:1]"})
    np.testing.assert_array_equal(even[0], images[0])  # PNG: the stored pixels exactly
    one_line_error(lambda: read_images(spec), "tiny_coco", "example 1", "24x16", "expected 20x16")
    batches = list(iter_images(spec, batch_size=4, size=(12, 12), resize=True))
    assert [b.shape for b in batches] == [(4, 12, 12, 3), (3, 12, 12, 3)]
    np.testing.assert_array_equal(batches[1][0], sources.fit_image(images[4], (12, 12)))
    assert sources.count_images(spec) == 7


def test_tfds_bad_sources_are_one_line_errors(tiny_coco):
    data_dir = tiny_coco["data_dir"]
    one_line_error(lambda: read_prompt_rows({"tfds": "no_such_set", "data_dir": data_dir}), "no_such_set",
                   "no prepared dataset")
    one_line_error(lambda: read_prompt_rows({"tfds": "tiny_coco", "split": "test", "data_dir": data_dir}),
                   "tiny_coco", "test")
    one_line_error(lambda: read_prompt_rows({"tfds": "tiny_coco", "split": "val", "data_dir": data_dir,
                                             "prompt_field": "caption"}), "example 0", "'caption'", "captions")
    one_line_error(lambda: read_prompt_rows({"tfds": "tiny_coco", "data_dir": data_dir, "splt": "val"}),
                   "unknown keys splt")
    one_line_error(lambda: read_images({"tfds": "tiny_coco", "split": "val", "data_dir": data_dir,
                                        "image_field": None}), "no image_field")
