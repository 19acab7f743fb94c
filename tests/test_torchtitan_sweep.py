"""Issue 14, torchtitan: a fixed subset of tests/sweep_torchtitan.py, one model per kind of buffer.

Each runs every meta flow, ``load_state_dict(assign=True)`` and torchtitan's trainer path
(``to_empty`` + ``init_weights(buffer_device=None)``), with and without bufferfix, bit for bit
against a normal build.  The full sweep (every debug flavor; a few minutes)::

    python -m pytest -m slow tests/test_torchtitan_sweep.py     # or: python tests/sweep_torchtitan.py
"""
import functools

import pytest

pytest.importorskip("torchtitan")
pytest.importorskip("triton")  # torchtitan 0.3.0 imports it even on CPU
pytest.importorskip("accelerate")

from sweeps import harness as libsweep
from sweeps import torchtitan as sweep_torchtitan

SUBSET = {
    "torchtitan.llama3.debugmodel": "ComplexRoPE cache (complex64), one per layer",
    "torchtitan.deepseek_v3.debugmodel": "YaRN RoPE cache + MoE tokens_per_expert / expert_bias buffers",
}
CASES = libsweep.subset(sweep_torchtitan.cases(), SUBSET)


@functools.cache
def checked(name):
    return libsweep.check(CASES[name])


@pytest.mark.parametrize("name", SUBSET)
def test_subset_gives_the_reference_in_every_flow(name):
    libsweep.assert_exact_with_bufferfix(checked(name))


@pytest.mark.parametrize("name", SUBSET)
def test_subset_is_broken_without_bufferfix(name):
    libsweep.assert_broken_without_bufferfix(checked(name))


@pytest.mark.slow
@pytest.mark.parametrize("case", sweep_torchtitan.cases(), ids=lambda case: case.name)
def test_every_model(case):
    result = libsweep.check(case)
    if result.skipped:
        pytest.skip(result.skipped)
    libsweep.assert_exact_or_named(result)
