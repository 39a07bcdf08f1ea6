"""The command line: one `--config FILE[:arg]` / `--config.x=y` parser for the `varejax` command and every
benchmark, `varejax config show`, and one-line errors for user errors only (bugs keep their traceback)."""

from __future__ import annotations

import argparse
import ast
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from varejax import configlib
from varejax.cli import main
from varejax.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[1]
# Every benchmark script that takes a config.
BENCHMARKS = sorted(p for p in (REPO / "benchmarks").glob("*.py") if 'add_argument("--config"' in p.read_text())


def _usage_lines(path: Path) -> list[list[str]]:
    """The `python benchmarks/X.py ...` command lines of a script's docstring, as argv lists."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    lines = [line.strip() for line in doc.splitlines() if f"benchmarks/{path.name}" in line]
    return [shlex.split(line.split(f"benchmarks/{path.name}", 1)[1]) for line in lines]


def _benchmark_parser(path: Path) -> argparse.ArgumentParser:
    """The options a benchmark declares (`--config` and the others), read from its source."""
    parser = argparse.ArgumentParser(exit_on_error=False)
    source = path.read_text()
    default = re.search(r'add_argument\("--config", default="([^"]+)"', source).group(1)
    parser.add_argument("--config", default=str(REPO / default))
    for option, rest in re.findall(r'add_argument\("(--(?!config")[\w-]+)"([^\n]*)', source):
        parser.add_argument(option, **({"action": "store_true"} if 'action="store_true"' in rest else {}))
    return parser


def test_split_overrides():
    rest, overrides = configlib.split_overrides(["erase", "--config", "c.py:x", "--config.a.b=(1, 2)", "--workdir",
                                                 "w", "--config.prompts=('a fox', 'a cat')"])
    assert rest == ["erase", "--config", "c.py:x", "--workdir", "w"]
    assert overrides == ["config.a.b=(1, 2)", "config.prompts=('a fox', 'a cat')"]
    with pytest.raises(ConfigError, match=r"--config.batch=VALUE"):
        configlib.split_overrides(["--config.batch", "2"])


@pytest.mark.parametrize("path", BENCHMARKS, ids=[p.stem for p in BENCHMARKS])
def test_benchmark_docstring_usage_parses(path, monkeypatch):
    """Each usage line a benchmark's docstring shows resolves to a config with its overrides applied."""
    monkeypatch.chdir(REPO)
    usages = _usage_lines(path)
    assert usages, f"{path.name}: no usage line in the docstring"
    for argv in usages:
        args, config = configlib.parse_config_args(_benchmark_parser(path), argv)
        for override in configlib.split_overrides(argv)[1]:
            key, _, raw = override.partition("=")
            node = config
            for part in key.split(".")[1:]:
                node = node[part]
            try:
                expected = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                expected = raw
            assert node == (tuple(expected) if isinstance(expected, list) else expected), (argv, key)


def test_forward_benchmark_docstring_usage_runs_as_a_script():
    """The docstring's `--config.batch=2` reaches the config (the run stops at a deliberately bad override
    after it, before anything is compiled); a bad override is a one-line usage error."""
    cmd = [sys.executable, "benchmarks/forward.py", "--config", "configs/forward_benchmark.py:2b", "--config.batch=2",
           "--config.batch_typo=1"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "config.batch_typo: no such field in configs/forward_benchmark.py" in out.stderr
    assert "Traceback" not in out.stderr


def test_overrides_check_types_and_fields():
    spec = str(REPO / "configs" / "erase.py") + ":church"
    config = configlib.load_config(spec, ["config.train.steps=7", "config.train.learning_rate=1", "config.pairs=[]"])
    assert (config.train.steps, config.train.learning_rate, config.pairs) == (7, 1.0, ())
    assert isinstance(config.train.learning_rate, float)
    with pytest.raises(ConfigError, match="config.train.steps=many"):
        configlib.load_config(spec, ["config.train.steps=many"])
    with pytest.raises(ConfigError, match=r"config.train.nope.x: no such field .*config.train.nope does not exist"):
        configlib.load_config(spec, ["config.train.nope.x=1"])
    with pytest.raises(ConfigError, match="not found"):
        configlib.load_config("configs/no_such_config.py")


def test_config_show_prints_the_resolved_recipe(capsys):
    assert main(["config", "show", "--config", str(REPO / "configs" / "erase.py") + ":church",
                 "--config.train.steps=100"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["train"]["steps"] == 100
    # The recipe the config file inherits from varejax/erase/defaults.py, spelled out.
    assert config["train"]["learning_rate"] == 2.34375e-05 and config["train"]["alpha"] == 0.25
    assert config["train"]["mode"] == "alternating" and config["prepare"]["guidance"] == 4.0
    assert config["pairs"] == ["pairs/church.jsonl"]
    assert config["mesh"]["rules"]


@pytest.mark.parametrize("argv, message", [
    (["config", "show", "--config", "configs/no_such.py"], "config file configs/no_such.py not found"),
    (["config", "show", "--config", "configs/erase.py", "--config.train.stepz=1"], "no such field"),
    (["erase", "prepare", "--config", "configs/toy_circle.py:ci", "--workdir", "unused"], "drop the phase"),
])
def test_user_errors_are_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("bug", [KeyError("params"), ValueError("shapes (3,) and (4,) not aligned")])
def test_programming_errors_keep_their_traceback(bug, monkeypatch):
    """A KeyError or ValueError from inside a stage is a bug, not a user error: it is not swallowed."""
    def broken(config):
        raise bug

    monkeypatch.setattr(configlib, "resolved_json", broken)
    with pytest.raises(type(bug)):
        main(["config", "show", "--config", str(REPO / "configs" / "erase.py")])
    assert not isinstance(bug, UserError)


def test_every_command_turns_the_compilation_cache_on(tmp_path, monkeypatch, capsys):
    import jax

    from varejax.cli import enable_compilation_cache

    before = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.setenv("VAREJAX_JAX_CACHE", str(tmp_path / "cache"))
        assert main(["config", "show", "--config", "configs/toy_train.py:smoke"]) == 0
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
        monkeypatch.setenv("VAREJAX_JAX_CACHE", "off")
        assert enable_compilation_cache() is None
        monkeypatch.delenv("VAREJAX_JAX_CACHE")
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jc"))
        assert enable_compilation_cache() == str(tmp_path / "jc")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
