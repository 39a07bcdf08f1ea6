"""File I/O through `varejax.paths` (etils.epath): local paths as before, and gs:// URIs on a remote backend.

The remote backend is offline: an in-memory fsspec filesystem stands behind epath's own fsspec backend for
gs:// (the backend epath uses for gs:// when TensorFlow is absent, with gcsfs in production), so a write that
bypassed epath (open, np.savez, pathlib) would land in a local `gs:/` folder and never reach the bucket.
Orbax writes arrays through tensorstore's GCS driver, not epath, so model folders and training checkpoints on
gs:// cannot be tested offline; `orbax_path` is checked to keep gs:// and refuse the schemes orbax cannot write.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem

from varejax import paths
from varejax.errors import UserError


class InMemoryBucket(MemoryFileSystem):
    """fsspec's memory filesystem answering gs:// paths, with a store of its own (not the global memory://)."""

    protocol = ("gs", "gcs")

    def __init__(self):
        super().__init__(global_store=False, skip_instance_cache=True)

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(os.fspath(path).removeprefix("gs://"))

    def files(self) -> dict[str, bytes]:
        """{"gs://bucket/path": contents} of every stored object."""
        return {"gs:/" + key: f.getvalue() for key, f in self.store.items()}


@pytest.fixture
def bucket(monkeypatch, tmp_path):
    """gs:// routed to a fresh in-memory bucket (through epath's fsspec backend); the cwd is an empty folder so
    that a write bypassing epath shows up as a local `gs:` folder."""
    fs = InMemoryBucket()
    monkeypatch.setenv("EPATH_USE_TF", "0")  # the fsspec backend even where TensorFlow is installed
    default = epath_backend.fsspec_backend.fs  # kept for local paths (a copy between backends asks it for both)
    monkeypatch.setattr(epath_backend.fsspec_backend, "fs",
                        lambda path: fs if os.fspath(path).startswith("gs://") else default(path))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield fs
    assert not os.listdir(cwd), f"files written outside epath: {os.listdir(cwd)}"


def test_as_path_keeps_uris_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(paths.as_path("gs://bucket/run") / "images") == "gs://bucket/run/images"
    assert str(paths.as_path("runs/a")) == str(tmp_path / "runs" / "a")
    assert paths.as_path(tmp_path / "x") == tmp_path / "x"
    assert paths.is_remote("s3://b/x") and not paths.is_remote("/tmp/x")
    with pytest.raises(UserError, match="unsupported URI scheme"):
        paths.as_path("memory://x")
    with pytest.raises(UserError, match=r"gs://b/model.pth: must be a local path \(torch.load"):
        paths.require_local("gs://b/model.pth", "torch.load reads local files")
    assert str(paths.orbax_path("gs://b/ckpt")) == "gs://b/ckpt"
    with pytest.raises(UserError, match="must be local or gs://"):
        paths.orbax_path("s3://b/ckpt")


@pytest.mark.parametrize("remote", [False, True])
def test_helpers_round_trip(remote, bucket, tmp_path):
    root = paths.as_path("gs://bucket/h" if remote else tmp_path / "h")
    root.mkdir(parents=True, exist_ok=True)
    paths.write_text_atomic(root / "a.json", '{"x": 1}\n')
    paths.write_text_atomic(root / "a.json", '{"x": 2}\n')  # replaces
    assert json.loads((root / "a.json").read_text()) == {"x": 2}
    paths.append_text(root / "log.jsonl", "1\n")
    paths.append_text(root / "log.jsonl", "2\n")
    assert (root / "log.jsonl").read_text() == "1\n2\n"
    paths.save_npz(root / "t.npz", x=np.arange(6).reshape(2, 3), s=np.asarray("prompt"))
    loaded = paths.load_npz(root / "t.npz")
    assert np.array_equal(loaded["x"], np.arange(6).reshape(2, 3)) and str(loaded["s"]) == "prompt"
    assert list(paths.load_npz(root / "t.npz", keys=("s",))) == ["s"]
    paths.save_safetensors(root / "d.safetensors", {"w": np.ones((2, 2), np.float32)}, {"format": "f"})
    assert np.array_equal(paths.load_safetensors(root / "d.safetensors")["w"], np.ones((2, 2), np.float32))
    with paths.local_copy(root / "a.json") as local:
        assert not paths.is_remote(local) and open(local).read() == '{"x": 2}\n'
    copy = paths.as_path(tmp_path / "copy") if remote else paths.as_path("gs://bucket/copy")
    paths.copy_tree(root, copy)  # across backends, both ways round the parametrisation
    assert sorted(p.name for p in copy.iterdir()) == ["a.json", "d.safetensors", "log.jsonl", "t.npz"]
    assert not any(".tmp" in p.name for p in root.iterdir())  # no temporary files left behind
    if remote:
        assert "gs://bucket/h/t.npz" in bucket.files()


def test_sample_to_a_gs_workdir_writes_the_local_files(bucket, tmp_path):
    """`varejax sample` (embedded toy world) with --workdir gs://...: every image, record and the grid land in
    the bucket, byte for byte the files of a local workdir; the text cache too; a re-run skips every image."""
    from varejax.cli import main

    local = tmp_path / "local"
    assert main(["sample", "--config.batch_size=4", "--workdir", str(local)]) == 0
    assert main(["sample", "--config.batch_size=4", "--workdir", "gs://bucket/run"]) == 0
    stored = bucket.files()
    expected = sorted(str(p.relative_to(local)) for p in local.rglob("*")
                      if p.is_file() and "text_cache" not in p.parts)
    got = sorted(k.removeprefix("gs://bucket/run/") for k in stored
                 if k.startswith("gs://bucket/run/") and "/text_cache/" not in k)
    assert got == expected and len(got) == 4 * 2 + 1
    for rel in expected:
        assert stored[f"gs://bucket/run/{rel}"] == (local / rel).read_bytes(), rel
    assert any("/text_cache/" in k and k.endswith(".npz") for k in stored)
    record = json.loads(epath.Path("gs://bucket/run/images/00000.json").read_text())
    assert record["index"] == 0
    assert main(["sample", "--config.batch_size=4", "--workdir", "gs://bucket/run"]) == 0
    assert bucket.files() == stored


def test_delta_and_trajectories_on_a_gs_workdir(bucket):
    """An erasure's outputs through the remote backend: delta.safetensors written and applied back, and stored
    trajectories read by the training data loader."""
    import jax

    from varejax.erase import optim
    from varejax.erase.data import TrajectoryBatches, text_length
    from varejax.erase.export import apply_delta, write_delta
    from varejax.erase.prepare import load_trajectory, trajectory_path
    from varejax.models import apply
    from varejax.paths import save_npz
    from varejax.toy.assets import load_toy_pipeline

    pipeline = load_toy_pipeline()
    cfg, params = pipeline.infinity_cfg, pipeline.infinity_params
    bumped = jax.tree.map(lambda v: v + 1, params)
    path = write_delta("gs://bucket/run/delta.safetensors", cfg, bumped, params)
    assert str(path) == "gs://bucket/run/delta.safetensors" and str(path) in bucket.files()
    restored = apply.flat_params(apply_delta(cfg, params, path))
    trained = optim.trainable_params(bumped, "ca_ffn")  # what a delta holds
    assert trained
    base = apply.flat_params(params)
    for key, value in trained.items():
        # what delta_tensors stores (bumped - base in float32) added back as apply_delta adds it: bit for bit
        original, bumped_value = np.asarray(base[key], np.float32), np.asarray(value, np.float32)
        np.testing.assert_array_equal(np.asarray(restored[key]), original + (bumped_value - original), err_msg=key)

    rng = np.random.default_rng(0)
    for i in range(3):
        save_npz(trajectory_path("gs://bucket/run/trajectories", i),
                 x_BLC_wo_prefix=rng.normal(size=(5, 4)).astype(np.float32), gt_bits=np.zeros((5, 2), np.int8),
                 teacher_logits=np.zeros((5, 3), np.float32), concept_logits=np.zeros((5, 3), np.float32),
                 anchor_text=np.ones((2 + i, 8), np.float32), target_text=np.ones((3, 8), np.float32),
                 pair=np.asarray(json.dumps({"target": "t", "anchor": f"a{i}"})), seed=np.asarray(i),
                 schedule=np.asarray([[1, 1, 1]], np.int32))
    files = [trajectory_path("gs://bucket/run/trajectories", i) for i in range(3)]
    assert load_trajectory(files[2])["pair"] == {"target": "t", "anchor": "a2"}
    assert text_length(files) == 8
    batch = TrajectoryBatches(files, batch_size=2, seed=0, text_len=8)[0]
    assert batch["x_BLC_wo_prefix"].shape == (2, 5, 4)


def test_small_files_on_a_gs_workdir(bucket):
    """Pair files, --arch JSON files, images and model-folder writes through the remote backend."""
    from varejax import images
    from varejax.checkpoint import ModelDirError, atomic_directory, read_config
    from varejax.convert.arch import infinity_arch
    from varejax.data.pairs import PromptPair, read_pairs, write_pairs

    pairs = [PromptPair("a red circle", "a circle", "red", "x"), PromptPair("a red square", "a square", "red", "y")]
    write_pairs(pairs, "gs://bucket/pairs.jsonl")
    assert [(p.target, p.anchor) for p in read_pairs("gs://bucket/pairs.jsonl")] == [(p.target, p.anchor)
                                                                                      for p in pairs]
    epath.Path("gs://bucket/arch.json").write_text(json.dumps({"model": {"depth": 2, "embed_dim": 64,
                                                                         "num_heads": 2}}))
    assert infinity_arch("gs://bucket/arch.json").depth == 2

    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    images.save_image("gs://bucket/im.png", image)
    assert np.array_equal(images.load_uint8("gs://bucket/im.png"), image)

    with atomic_directory("gs://bucket/model") as folder:  # an object store: written in place
        assert str(folder) == "gs://bucket/model"
        (folder / "config.json").write_text("{}")
    assert read_config("gs://bucket/model") == {}
    with pytest.raises(ModelDirError, match="already exists"):
        with atomic_directory("gs://bucket/model"):
            pass
    with pytest.raises(RuntimeError), atomic_directory("gs://bucket/broken") as folder:
        (folder / "params").write_text("half")
        raise RuntimeError("interrupted")
    assert not epath.Path("gs://bucket/broken").exists()  # a failed write leaves nothing behind


def test_inputs_that_must_be_local_name_the_path():
    """torch.load / safetensors / tokenizers open local files only: a URI is refused with its path and why."""
    from varejax.convert.sources import open_checkpoint
    from varejax.convert.t5 import convert_t5

    with pytest.raises(UserError, match=r"gs://b/infinity_2b_reg.pth: must be a local path \(upstream checkpoints"):
        open_checkpoint("gs://b/infinity_2b_reg.pth")
    with pytest.raises(UserError, match=r"gs://b/flan-t5-xl: must be a local path \(an HF T5 folder"):
        convert_t5("gs://b/flan-t5-xl", None, dry_run=True)
