"""torchtune: a fixed subset of the torchtune sweep (tests/sweeps/torchtune.py), one builder per kind of buffer.

Each runs every meta flow, ``load_state_dict(assign=True)`` and torchtune's recipe path, with and
without bufferfix, bit for bit against a normal build.  The full sweep (every builder, plain / LoRA /
DoRA; about a minute)::

    python -m pytest -m slow tests/test_torchtune_sweep.py      # or, in tests/: python -m sweeps.torchtune
"""
import functools

import pytest

pytest.importorskip("torchtune")
pytest.importorskip("accelerate")

from sweeps import harness
from sweeps import torchtune as sweep

SUBSET = {
    "torchtune.llama3.llama3": "RotaryPositionalEmbeddings theta / cache, one module shared by every layer",
    "torchtune.llama3_2.lora_llama3_2(use_dora)": "Llama3ScaledRoPE: no cache / theta at all when built on meta",
    "torchtune.llama3_1.llama3_1": "Llama3ScaledRoPE, plain builder",
    "torchtune.qwen2.lora_qwen2": "RoPE under LoRA layers",
    "torchtune.t5.t5_encoder": "T5 relative-position bucket table",
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
def test_every_builder(case, sweep_results):
    harness.in_full_sweep(harness.check(case), sweep_results)
