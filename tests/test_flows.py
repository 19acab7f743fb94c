"""Every meta flow, on hand-written modules: bit-identical with bufferfix, broken without."""
import pytest
import torch
from compare import assert_matches_reference, broken_buffers
from models import Alibi, CausalMask, OnTorchChildren, PositionIds, ScaledAfterRegistration, Signature, Sinusoidal, Zoo

from bufferfix.flows import FLOWS

MODELS = {
    "zoo": lambda: Zoo(),
    "sinusoidal": lambda: Sinusoidal(12, 6),
    "alibi": lambda: Alibi(8),
    "bool causal mask": lambda: CausalMask(5),
    "scaled in place": lambda: ScaledAfterRegistration(7, scale=2.5),
    "*args/kw-only/**kwargs": lambda: Signature(3, 4, scale=0.25, offset=-1.0),
    "expanded int64 position_ids": lambda: PositionIds(9),
    "put on torch.nn children by the parent": lambda: OnTorchChildren(),
}


def reference_of(build):
    torch.manual_seed(0)
    return build()


@pytest.mark.parametrize("flow", FLOWS)
@pytest.mark.parametrize("model", MODELS)
def test_flow_restores_every_buffer(model, flow):
    reference = reference_of(MODELS[model])
    materialised = FLOWS[flow](MODELS[model], reference.state_dict())
    assert_matches_reference(materialised, reference)


@pytest.mark.parametrize("flow", FLOWS)
@pytest.mark.parametrize("model", MODELS)
def test_flow_is_broken_without_bufferfix(model, flow, without_bufferfix):
    reference = reference_of(MODELS[model])
    materialised = FLOWS[flow](MODELS[model], reference.state_dict())
    assert broken_buffers(materialised, reference) != []


@pytest.mark.parametrize("flow", ["torch.device('meta')", "init_empty_weights", ".to('meta')"])
def test_cast_to_bf16_before_materialisation(flow):
    """Buffers take the dtype the materialised buffer has, exactly like .to(bf16) on a normal build."""
    reference = reference_of(Zoo).to(torch.bfloat16)
    materialised = FLOWS[flow](lambda: Zoo().to(torch.bfloat16), reference.state_dict())
    assert_matches_reference(materialised, reference)


def test_forward_matches_after_materialisation():
    reference = reference_of(lambda: Sinusoidal(12, 6))
    materialised = FLOWS["torch.device('meta')"](lambda: Sinusoidal(12, 6), reference.state_dict())
    x = torch.randn(2, 12, 6)
    assert torch.equal(materialised(x), reference(x))


def test_load_state_dict_with_assign_on_a_meta_model():
    """What torch.distributed.checkpoint does with meta tensors: parameters assigned, no to_empty."""
    reference = reference_of(Zoo)
    with torch.device("meta"):
        model = Zoo()
    model.load_state_dict(reference.state_dict(), assign=True)
    assert_matches_reference(model, reference)


def test_load_state_dict_with_assign_is_broken_without_bufferfix(without_bufferfix):
    reference = reference_of(Zoo)
    with torch.device("meta"):
        model = Zoo()
    model.load_state_dict(reference.state_dict(), assign=True)
    assert broken_buffers(model, reference) != []
