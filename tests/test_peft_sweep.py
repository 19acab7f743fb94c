"""PEFT: a fixed subset of the PEFT sweep (tests/sweeps/peft.py), one tuner per kind of buffer, on a tiny Llama.

Each runs every meta flow, ``load_state_dict(assign=True)`` and PEFT's own paths (``get_peft_model``
and ``PeftModel.from_pretrained(..., low_cpu_mem_usage=True)`` on a meta base, and on a base from
transformers' ``from_pretrained``), with and without bufferfix, bit for bit against a normal build.
The full sweep (every tuner type PEFT registers; about a minute)::

    python -m pytest -m slow tests/test_peft_sweep.py            # or, in tests/: python -m sweeps.peft
"""
import functools
import warnings

import pytest

pytest.importorskip("peft")
pytest.importorskip("accelerate")

from sweeps import harness
from sweeps import peft as sweep

import bufferfix
from bufferfix.recovery import Reason

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
    "peft.UNILORA": "seeded indices and scales UniLoRA moves to the base layer's device (meta) itself, "
                    "also back to meta after PeftModel.from_pretrained's load_state_dict(assign=True)",
}
FROM_A_PRETRAINED_WEIGHT = ["peft.OSF", "peft.PSOFT", "peft.TRAINABLE_TOKENS"]  # unrecoverable by design
CASES = harness.subset(sweep.cases(), list(SUBSET) + FROM_A_PRETRAINED_WEIGHT)


@functools.cache
def checked(name):
    return harness.check(CASES[name])


@pytest.mark.parametrize("name", SUBSET)
def test_subset_gives_the_reference_in_every_flow(name):
    harness.assert_exact_with_bufferfix(checked(name))


@pytest.mark.parametrize("name", SUBSET)
def test_subset_is_broken_without_bufferfix(name):
    harness.assert_broken_without_bufferfix(checked(name))


@pytest.mark.parametrize("flow", ["torch.device('meta')", sweep.GET_PEFT_MODEL_META,
                                  sweep.FROM_PRETRAINED_META])
@pytest.mark.parametrize("name", FROM_A_PRETRAINED_WEIGHT)
def test_buffers_computed_from_a_pretrained_weight_are_named_with_that_reason(name, flow):
    """OSF / PSOFT / TrainableTokens compute these from the base layer's weight when the adapter is made:
    each is named with Reason.FROM_PRETRAINED_WEIGHT (not a replay's generic verdict), and nothing else is."""
    from bufferfix.integrations.peft import FROM_PRETRAINED_WEIGHT

    case = CASES[name]
    reference = case.build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        case.all_flows()[flow].load(case.build, reference)
    warned = [w.message for w in caught if isinstance(w.message, bufferfix.UnrecoverableBufferWarning)]
    recoveries = [recovery for message in warned for recovery in message.recoveries]
    declared = {attribute for _, _, attributes in FROM_PRETRAINED_WEIGHT for attribute in attributes}
    assert recoveries, "nothing named"
    assert {recovery.reason for recovery in recoveries} == {Reason.FROM_PRETRAINED_WEIGHT}
    assert all(recovery.name.split(".")[-2] in declared for recovery in recoveries)
    assert all(recovery.name in str(warned[0]) for recovery in recoveries)
    assert "make this adapter on a loaded base model" in str(warned[0])


@pytest.mark.slow
@pytest.mark.parametrize("case", sweep.cases(), ids=lambda case: case.name)
def test_every_tuner(case, sweep_results):
    harness.in_full_sweep(harness.check(case), sweep_results)
