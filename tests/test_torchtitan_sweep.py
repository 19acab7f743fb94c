"""torchtitan: a fixed subset of the torchtitan sweep (tests/sweeps/torchtitan.py), one model per kind of buffer.

Each runs every meta flow, ``load_state_dict(assign=True)`` and torchtitan's trainer path
(``to_empty`` + ``init_weights(buffer_device=None)``), with and without bufferfix, bit for bit
against a normal build.  The full sweep (every debug flavor; a few minutes)::

    python -m pytest -m slow tests/test_torchtitan_sweep.py     # or, in tests/: python -m sweeps.torchtitan
"""
import functools

import pytest

pytest.importorskip("torchtitan")
pytest.importorskip("triton")  # torchtitan 0.3.0 imports it even on CPU
pytest.importorskip("accelerate")

from sweeps import harness
from sweeps import torchtitan as sweep

SUBSET = {
    "torchtitan.llama3.debugmodel": "ComplexRoPE cache (complex64), one per layer",
    "torchtitan.deepseek_v3.debugmodel": "YaRN RoPE cache + MoE tokens_per_expert / expert_bias buffers",
}
CASES = harness.subset(sweep.cases(), SUBSET)


@functools.cache
def checked(name):
    return harness.check(CASES[name])


@pytest.mark.parametrize("name", SUBSET)
def test_subset_gives_the_reference_in_every_flow(name):
    harness.assert_exact_with_bufferfix(checked(name))


@pytest.mark.parametrize("name", SUBSET)
def test_subset_is_broken_without_bufferfix(name):
    harness.assert_broken_without_bufferfix(checked(name))


@pytest.mark.slow
@pytest.mark.parametrize("case", sweep.cases(), ids=lambda case: case.name)
def test_every_model(case, sweep_results):
    harness.in_full_sweep(harness.check(case), sweep_results)
