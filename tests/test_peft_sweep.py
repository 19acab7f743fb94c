"""Issue 14, PEFT: a fixed subset of tests/sweep_peft.py, one tuner per kind of buffer, on a tiny Llama.

Each runs every meta flow, ``load_state_dict(assign=True)`` and PEFT's own paths (``get_peft_model``
and ``PeftModel.from_pretrained(..., low_cpu_mem_usage=True)`` on a meta base, and on a base from
transformers' ``from_pretrained``), with and without bufferfix, bit for bit against a normal build.
The full sweep (every tuner type PEFT registers; about a minute)::

    python -m pytest -m slow tests/test_peft_sweep.py            # or: python tests/sweep_peft.py
"""
import functools

import pytest

pytest.importorskip("peft")
pytest.importorskip("accelerate")

import libsweep  # noqa: E402
import sweep_peft  # noqa: E402

SUBSET = {
    "peft.LORA": "LoRA layers over the base's rotary inv_freq",
    "peft.LORA(use_dora)": "DoRA",
    "peft.BOFT": "BOFT's non-persistent block-diagonal permutation buffers",
    "peft.OFT": "OFT's non-persistent buffers",
    "peft.VERA(save_projection=False)": "projections drawn from projection_prng_key in the tuner's constructor",
    "peft.RANDLORA(save_projection=False)": "same, RandLoRA",
    "peft.VERA(save_projection=True)": "projections saved: persistent",
    "peft.FOURIERFT": "indices: tensors in a dict attribute",
    "peft.PROMPT_TUNING": "prompt_tokens: tensors in a dict attribute of PeftModel",
}
CASES = libsweep.subset(sweep_peft.cases(), SUBSET)


@functools.lru_cache(maxsize=None)
def checked(name):
    return libsweep.check(CASES[name])


@pytest.mark.parametrize("name", SUBSET)
def test_subset_gives_the_reference_in_every_flow(name):
    libsweep.assert_exact_with_bufferfix(checked(name))


@pytest.mark.parametrize("name", SUBSET)
def test_subset_is_broken_without_bufferfix(name):
    libsweep.assert_broken_without_bufferfix(checked(name))


@pytest.mark.slow
@pytest.mark.parametrize("case", sweep_peft.cases(), ids=lambda case: case.name)
def test_every_tuner(case):
    result = libsweep.check(case)
    if result.skipped:
        pytest.skip(result.skipped)
    libsweep.assert_exact_or_named(result)
