"""The scorer registry of `varejax eval` (varejax/eval/scorers.py)."""

from __future__ import annotations

import numpy as np
import pytest

from varejax.errors import UserError
from varejax.eval import scorers


class _Brightness:
    name = "brightness"

    def __init__(self, cutoff: float = 128.0):
        self.cutoff = cutoff

    def settings(self):
        return {"cutoff": self.cutoff}

    def score(self, images, rows):
        return {"mean": images.reshape(len(images), -1).mean(1)}

    def summarize(self, per_image, rows):
        return {"bright_share": float(np.mean(per_image["mean"] > self.cutoff))}


def test_a_registered_plugin_is_built_with_its_options():
    scorers.register_scorer("brightness_test")(_Brightness)
    scorer = scorers.build_scorer("brightness_test", {"cutoff": 10.0})
    images = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (0, 5, 200)])
    rows = [{"prompt": "p", "seed": i} for i in range(3)]
    assert scorer.settings() == {"cutoff": 10.0}
    assert scorer.summarize(scorer.score(images, rows), rows) == {"bright_share": pytest.approx(1 / 3)}
    assert "brightness_test" in scorers.available_scorers()


def test_unknown_scorer_and_bad_factory_and_bad_module():
    with pytest.raises(UserError, match="unknown scorer 'nope'"):
        scorers.build_scorer("nope")
    scorers.register_scorer("not_a_scorer_test")(lambda: object())
    with pytest.raises(TypeError, match="not a Scorer"):
        scorers.build_scorer("not_a_scorer_test")
    with pytest.raises(UserError, match="cannot be imported"):
        scorers.import_plugins(["varejax_no_such_module_xyz"])


def test_check_images_names_the_source_and_the_problem():
    good = np.zeros((2, 8, 8, 3), np.uint8)
    assert scorers.check_images(good, "x.npz", (8, 8)) is not None
    with pytest.raises(UserError, match=r"x.npz: images are 8x8, expected 16x16"):
        scorers.check_images(good, "x.npz", (16, 16))
    with pytest.raises(UserError, match="must be uint8"):
        scorers.check_images(good.astype(np.float32), "x.npz")
    with pytest.raises(UserError, match=r"\[N, H, W, 3\]"):
        scorers.check_images(np.zeros((2, 8, 8), np.uint8), "x.npz")
