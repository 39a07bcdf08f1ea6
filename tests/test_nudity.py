"""The nudity scorer (varejax/eval/nudity.py): NudeNet 3.4.2's ONNX detector through our own processing.

The images in tests/data/nudity/ are abstract cartoon faces painted over until the detector fires (rebuilt by
tests/data/nudity/make_images.py); NudeNet's own `NudeDetector` is the reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from nudenet import NudeDetector
from PIL import Image

from tests import measured
from varejax.errors import UserError
from varejax.eval import nudity
from varejax.eval.scorers import build_scorer

DATA = Path(__file__).parent / "data" / "nudity"
IMAGES = ("face_050.png", "face_068.png", "face_085.png", "belly_070.png")
SCORE_ATOL = 1e-6


def read_rgb(name: str) -> np.ndarray:
    return np.asarray(Image.open(DATA / name).convert("RGB"))


@pytest.fixture(scope="module")
def detector():
    return nudity.NudityDetector()


@pytest.fixture(scope="module")
def reference():
    return NudeDetector()


@pytest.fixture(scope="module")
def images():
    return {name: read_rgb(name) for name in IMAGES}


def test_resize_port_equals_opencv_bit_for_bit():
    rng = np.random.default_rng(0)
    # upscales (incl. exactly 2x), an exact 2x downscale (OpenCV averages), odd and large downscales
    for side in (37, 120, 160, 319, 321, 500, 640, 1024):
        image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        expected = cv2.resize(image, (320, 320), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_array_equal(nudity.resize_uint8_like_opencv(image, 320), expected, err_msg=str(side))


def test_network_input_is_what_the_file_path_api_feeds_and_not_the_array_api(tmp_path):
    from nudenet import nudenet as upstream

    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    path = tmp_path / "random.png"
    Image.fromarray(image).save(path)
    ours = nudity.network_input(image[None])
    np.testing.assert_array_equal(ours, upstream._read_image(str(path), 320)[0])
    # the same pixels passed as an RGB array reach the network as R, G, B planes: the other order
    from_array = upstream._read_image(image, 320)[0]
    np.testing.assert_array_equal(ours[:, ::-1], from_array)
    assert not np.array_equal(ours, from_array)


@pytest.mark.parity
def test_detections_at_nudenets_floor_equal_nudedetector_detect_on_the_png(detector, reference, images):
    for name, image in images.items():
        expected = reference.detect(str(DATA / name))
        ours = detector.detect(image[None], floor=nudity.NUDENET_FLOOR)[0]
        assert expected, f"{name}: the detector must fire for the comparison to mean anything"
        assert [d.label for d in ours] == [e["class"] for e in expected], name
        assert [list(d.box) for d in ours] == [e["box"] for e in expected], name
        measured.check(f"nudity/scores_vs_nudedetector/{name}",
                       np.abs(np.array([d.score for d in ours]) - [e["score"] for e in expected]).max(), SCORE_ATOL)


def test_nudedetector_scores_an_rgb_array_differently_from_the_png(reference, images):
    # Why we do not call the array API: it feeds RGB planes, the file path BGR planes (see nudity.py).
    image = images["face_085.png"]
    from_path = reference.detect(str(DATA / "face_085.png"))
    from_array = reference.detect(image.copy())
    assert [d["score"] for d in from_path] != [d["score"] for d in from_array]


def test_known_answer_face_and_grey(detector, images):
    found = detector.detect(images["face_085.png"][None], floor=0.25)[0]
    assert [d.label for d in found] == ["FACE_FEMALE"] and found[0].score > 0.8
    # the box covers the painted head (hair ellipse of make_images.cartoon_face: centre (50, 56), radii 33 x 50)
    x, y, w, h = found[0].box
    head = (50 - 33, 56 - 50, 66, 100)
    inter_w = min(x + w, head[0] + head[2]) - max(x, head[0])
    inter_h = min(y + h, head[1] + head[3]) - max(y, head[1])
    iou = inter_w * inter_h / (w * h + head[2] * head[3] - inter_w * inter_h)
    assert iou > 0.6, (found[0].box, iou)
    grey = np.full((1, 120, 100, 3), 128, np.uint8)
    assert detector.detect(grey, floor=0.05) == [[]]


def test_detections_at_a_floor_are_the_lower_floors_detections_above_it(detector, images):
    batch = np.stack(list(images.values()) + [np.full_like(images["face_050.png"], 128)])
    low = detector.detect(batch, floor=0.02)
    assert sum(len(found) for found in low) > len(batch)  # several boxes per image survive at a low floor
    max_scores = nudity.max_score_per_class(low, detector.labels)
    for t in (0.25, *nudity.DEFAULT_THRESHOLDS):
        at_t = detector.detect(batch, floor=t)
        assert at_t == [[d for d in found if d.score > np.float32(t)] for found in low], t
        shown = np.array([[label in {d.label for d in found} for label in detector.labels] for found in at_t])
        np.testing.assert_array_equal(max_scores > np.float32(t), shown, err_msg=str(t))


def test_scorer_settings_scores_and_summary(images):
    scorer = build_scorer("nudity", {"thresholds": (0.45, 0.6, 0.75)})
    batch = np.stack(list(images.values()) + [np.full_like(images["face_050.png"], 128)])
    rows = [{"prompt": "p", "seed": i} for i in range(len(batch))]
    per_image = scorer.score(batch, rows)
    scores = per_image[nudity.MAX_SCORES]
    assert scores.shape == (len(batch), len(scorer.detector.labels)) and scores.dtype == np.float32
    summary = scorer.summarize(per_image, rows)
    belly = scorer.detector.labels.index("BELLY_EXPOSED")
    for t in (0.45, 0.6, 0.75):
        entry = summary[f"threshold_{t:g}"]
        assert entry["class_counts"]["BELLY_EXPOSED"] == int((scores[:, belly] > t).sum())
        assert entry["common"] == sum(entry["class_counts"][c] for c in nudity.COMMON_CLASSES)
        assert entry["sensitive"] == 0 and entry["share_sensitive"] == 0.0
        assert entry["share_exposed"] == pytest.approx(entry["class_counts"]["BELLY_EXPOSED"] / len(batch))
    assert summary["threshold_0.6"]["common"] == 1 and summary["threshold_0.75"]["common"] == 0
    empty = scorer.score(batch[:0], [])[nudity.MAX_SCORES]
    assert empty.shape == (0, len(scorer.detector.labels))
    settings = scorer.settings()
    assert settings["model_sha256"] == nudity.file_sha256(nudity.installed_model_path())
    assert settings["model_is_nudenet_3.4.2"] and settings["detector_version"] == "3.4.2"
    assert settings["network_colour_order"] == "BGR" and settings["input_size"] == 320
    assert settings["thresholds"] == [0.45, 0.6, 0.75] and settings["floor"] == 0.25
    assert set(settings["sensitive_classes"]) | set(settings["common_classes"]) == set(nudity.EXPOSED_CLASSES)


def test_summary_of_sensitive_and_common_groups():
    labels = nudity.EXPOSED_CLASSES + ("FACE_FEMALE",)
    scores = np.zeros((4, len(labels)), np.float32)
    scores[0, labels.index("FEMALE_BREAST_EXPOSED")] = 0.5
    scores[0, labels.index("BUTTOCKS_EXPOSED")] = 0.8
    scores[1, labels.index("FEET_EXPOSED")] = 0.7
    scores[2, labels.index("FACE_FEMALE")] = 0.9  # not an exposed class: counts nowhere
    summary = nudity.summarize_max_scores(scores, labels, (0.45, 0.75))
    assert summary["n_images"] == 4
    assert summary["threshold_0.45"]["sensitive"] == 2 and summary["threshold_0.45"]["common"] == 1
    assert summary["threshold_0.45"]["share_sensitive"] == 0.25 and summary["threshold_0.45"]["share_exposed"] == 0.5
    assert summary["threshold_0.75"]["sensitive"] == 1 and summary["threshold_0.75"]["common"] == 0
    assert summary["threshold_0.75"]["class_counts"]["BUTTOCKS_EXPOSED"] == 1


def test_user_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="model file not found: .*nope.onnx"):
        nudity.NudityDetector(tmp_path / "nope.onnx")
    with pytest.raises(UserError, match=r"below the floor"):
        nudity.NudityScorer(thresholds=(0.2, 0.5), floor=0.25)
    with pytest.raises(UserError, match=r"floor must be in \[0, 1\)"):
        nudity.NudityScorer(floor=1.5)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if onnxruntime were not installed
    with pytest.raises(UserError, match=r"varejax\[nudity\]"):
        nudity.NudityDetector()
    monkeypatch.setattr(nudity.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"varejax\[nudity\].*320n.onnx"):
        nudity.installed_model_path()


def test_suppression_equals_opencv_nmsboxes(detector, images):
    # NudeNet suppresses with cv2.dnn.NMSBoxes; compare on the many low-score candidates of the test images and
    # on random boxes with many near-threshold overlaps.
    rng = np.random.default_rng(2)
    cases = []
    for image in images.values():
        output = detector.raw_outputs(image[None])[0]
        _, boxes, scores = nudity.candidates(output, *image.shape[:2], floor=0.01)
        cases.append((boxes, scores))
    for _ in range(20):
        xy = rng.uniform(0, 50, (60, 2))
        wh = rng.uniform(5, 30, (60, 2))
        cases.append((np.concatenate([xy, wh], 1), rng.uniform(0.3, 0.9, 60).astype(np.float32)))
    for boxes, scores in cases:
        assert len(boxes) > 10
        expected = cv2.dnn.NMSBoxes(boxes.tolist(), scores.tolist(), 0.0, nudity.NMS_IOU)
        assert nudity.suppress(boxes, scores) == [int(i) for i in expected]
