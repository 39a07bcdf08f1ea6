"""Test setup: 8 fake CPU devices (set before JAX is imported), fixture discovery, cached conversions."""

from __future__ import annotations

import os

# Sharding tests need several devices; on CPU XLA fakes them. Must happen before `import jax`.
# Tests compile many small programs: LLVM -O0 halves XLA:CPU compile time and keeps IEEE semantics
# (no fast-math either way), but the numbers are not bit-identical to the default level (other
# instruction selection and summation order: e.g. the bf16 cross-attention emulation's max error on the
# main fixture is 4.2e-4 at -O0, 3.4e-6 at the default level). So every bound must hold at both: .ci/run
# runs the parity tests a second time with VAREJAX_XLA_O0=0 (XLA's default optimisation level).
XLA_O0 = os.environ.get("VAREJAX_XLA_O0", "1") != "0"
_FLAGS = ("--xla_force_host_platform_device_count=8",) + (("--xla_backend_optimization_level=0",) if XLA_O0 else ())
for _flag in _FLAGS:
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

# Identical programs compiled by different tests (new jit wrappers of the same function) hit this
# cache instead of recompiling.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("VAREJAX_JAX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)

from tests import fixtures, measured  # noqa: E402


def _xla_line() -> str:
    return f"XLA backend optimisation: {'-O0 (VAREJAX_XLA_O0=0 for the default)' if XLA_O0 else 'default'}"


def pytest_report_header(config):
    return [fixtures.summary()[0], _xla_line()]


def pytest_runtest_setup(item):
    """A test marked `missing_fixture` (tests/fixtures.py) fails here with the mark's message."""
    mark = item.get_closest_marker("missing_fixture")
    if mark is not None:
        pytest.fail(mark.kwargs["reason"], pytrace=False)


def pytest_sessionfinish(session, exitstatus):
    """Fails the run when a fixture kind the suite needs is absent or unreadable, whichever tests ran
    (unless VAREJAX_ALLOW_MISSING_FIXTURES=1); writes the parity checks' measured errors to
    $VAREJAX_MEASURED when set (tests/measured.py)."""
    measured.write_if_requested(xla_optimisation="-O0" if XLA_O0 else "default", fixtures=fixtures.summary()[0],
                                passed=exitstatus == pytest.ExitCode.OK)
    _, problems = fixtures.summary()
    if problems and not fixtures.missing_allowed() and exitstatus in (pytest.ExitCode.OK,
                                                                       pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """How many fixture folders of each kind the run used, and why it fails if some are missing."""
    line, problems = fixtures.summary()
    terminalreporter.write_sep("-", "golden fixtures")
    terminalreporter.write_line(line)
    terminalreporter.write_line(_xla_line())
    for problem in problems:
        if fixtures.missing_allowed():
            terminalreporter.write_line(f"allowed by {fixtures.ALLOW_MISSING}=1: {problem}", yellow=True)
        else:
            terminalreporter.write_line(f"FAIL: {problem}", red=True, bold=True)


def _converted_once(tmp_path_factory, prefix: str, name: str, convert):
    """A getter that runs `convert(folder, out)` once per fixture folder per session and returns `out`."""
    cache: dict[str, str] = {}

    def get(folder: str) -> str:
        if folder not in cache:
            out = tmp_path_factory.mktemp(prefix) / name
            convert(folder, str(out))
            cache[folder] = str(out)
        return cache[folder]

    return get


@pytest.fixture(scope="session")
def converted_infinity(tmp_path_factory):
    """Converts each Infinity fixture once per session through the production converter (CLI path)."""
    return _converted_once(tmp_path_factory, "converted", "model", fixtures.convert_transformer)


@pytest.fixture(scope="session")
def converted_vae(tmp_path_factory):
    """Converts each fixture's tokenizer once per session through the production converter (CLI path)."""
    return _converted_once(tmp_path_factory, "converted_vae", "vae", fixtures.convert_vae)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, converted_infinity, converted_vae):
    """Converted folders of a whole tiny text-to-image model: the first Infinity fixture's transformer and
    tokenizer, and a random tiny T5 of the matching width with a small word tokenizer (min_vocab 100)."""
    from tests import t5_helpers

    folder = fixtures.first_infinity_folder()
    width = fixtures.config(folder)["transformer_config"]["Ct5"]
    t5_src = tmp_path_factory.mktemp("t5_src")
    t5_helpers.make_encoder(seed=0, d_model=width, d_kv=width // 4).save_pretrained(t5_src)
    t5_helpers.small_word_tokenizer().save(str(t5_src / "tokenizer.json"))
    t5_dir = tmp_path_factory.mktemp("t5") / "t5"
    t5_helpers.convert(t5_src, t5_dir)
    return {"infinity": converted_infinity(folder), "vae": converted_vae(folder), "t5": str(t5_dir),
            "fixture": str(folder)}
