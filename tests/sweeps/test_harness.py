"""The sweep harness's own judgement: what it compares, and how it says exact / named / silent.

Results are made by hand here (no flow is run), so each rule is tested on its own and a change in
bufferfix cannot make these pass or fail.
"""
import warnings

import torch
from torch import nn

from bufferfix.recovery import Reason, Recovery

from . import harness

FLOW = "torch.device('meta')"
FILES = "from_pretrained"


class Tables(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.arange(4.0), persistent=False)
        self.register_buffer("first", self.table[:1], persistent=False)
        self.freqs = [torch.zeros(2)]
        self.scale = torch.tensor(2.0)
        self.linear = nn.Linear(2, 2)


def test_every_kind_of_tensor_is_compared_bit_for_bit():
    reference, model = Tables(), Tables()
    model.linear.load_state_dict(reference.linear.state_dict())
    assert {kind: names for kind, names in harness.differences(model, reference).items() if names} == {}
    model.register_buffer("first", model.table[:1].clone(), persistent=False)  # own storage, same values
    model.freqs[0] = torch.tensor([0.0, -0.0])  # -0.0 == 0.0, but not bit for bit
    model.scale = model.scale.double()
    model.linear.bias.data[0] = float("nan")
    found = harness.differences(model, reference)
    assert found["storage"] == ["buffer first"]
    assert found["container"] == ["freqs[0]"]
    assert found["attribute"] == ["scale"]
    assert found["state"] == ["linear.bias"]
    assert found["buffer"] == found["sharing"] == found["stale"] == []


def test_a_weight_norm_attribute_is_compared_as_the_forward_sees_it_and_reported_stale():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        reference, model = nn.utils.weight_norm(nn.Linear(2, 2)), nn.utils.weight_norm(nn.Linear(2, 2))
    model.load_state_dict(reference.state_dict())
    model.weight = torch.full((2, 2), float("nan"))  # what a computation from unloaded parameters leaves
    found = harness.differences(model, reference)
    assert found["stale"] == ["weight"]
    assert found["attribute"] == []


def _result(with_bufferfix, without_bufferfix=None, from_files=()):
    flows = list(with_bufferfix)
    return harness.Result("case", flows=flows, from_files=list(from_files), with_bufferfix=with_bufferfix,
                          without_bufferfix=without_bufferfix or {})


def test_a_tensor_is_named_only_when_a_warning_names_it():
    ran = harness.FlowResult(differences={"buffer": ["a.inv_freq", "b.inv_freq"], "output": ["differ"]},
                             warnings=["bufferfix could not recover a.inv_freq"], named=["a.inv_freq"])
    result = _result({FLOW: ran})
    assert result.verdicts(FLOW) == {("buffer", "a.inv_freq"): "named", ("buffer", "b.inv_freq"): "silent",
                                     ("output", "differ"): "silent"}
    assert result.silent() == {FLOW: [("buffer", "b.inv_freq"), ("output", "differ")]}
    ran.named.append("b.inv_freq")
    assert set(result.verdicts(FLOW).values()) == {"named"}  # the outputs follow from named tensors
    assert result.silent() == {}


def test_wrong_outputs_no_tensor_explains_are_silent_even_with_a_warning():
    ran = harness.FlowResult(differences={"buffer": [], "output": ["differ"]}, warnings=["about x"], named=["x"])
    result = _result({FLOW: ran})
    assert result.verdicts(FLOW) == {("output", "differ"): "silent"}
    assert result.false_alarms(FLOW) == ["exact, yet named: x"]


def test_a_warning_about_an_exact_flow_is_a_false_alarm():
    result = _result({FLOW: harness.FlowResult(differences={"buffer": []}, warnings=["about x"], named=["x"])})
    assert result.broken() == {}
    assert result.false_alarms(FLOW) == ["about x"]


def test_what_goes_wrong_both_ways_is_the_flow_s_not_bufferfix_s():
    state = harness.FlowResult(differences={"state": ["w"], "output": ["differ"]})
    raised = harness.FlowResult(error="RuntimeError: no")
    result = _result({FLOW: state, "raises": raised}, {FLOW: state, "raises": raised})
    assert result.broken() == {}
    raised_only_with = _result({FLOW: raised}, {FLOW: harness.FlowResult(differences={"buffer": ["a"]})})
    assert raised_only_with.verdicts(FLOW) == {("raised", "RuntimeError: no"): "silent"}


def test_outputs_differing_both_ways_are_forgiven_only_in_a_flow_loading_files():
    outputs = harness.FlowResult(differences={"buffer": [], "output": ["differ"]})
    for flow, broken in ((FILES, {}), (FLOW, {FLOW: {"output": ["differ"]}})):
        result = _result({flow: outputs}, {flow: outputs}, from_files=[FILES])
        assert result.broken() == broken


def _recovery(name, owner):
    return Recovery(name=name, owner=owner, kind="buffer", source=None, reason=Reason.RANDOM)


def test_a_warning_names_a_tensor_by_path_under_every_name_of_that_tensor():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            rope = Tables()
            self.a, self.b = rope, rope

    model = Shared()
    named, relative, unmatched = harness.named_by([_recovery("a.table", "Tables")], model, model)
    assert named == ["a.table", "b.table"] and relative == [] and unmatched == []
    named, relative, _ = harness.named_by([_recovery("table", "Tables")], model, model)  # relative to a submodule
    assert named == relative == ["a.table", "b.table"]
    named, _, _ = harness.named_by([_recovery("a.<buffers registered off meta>", "Tables")], model, model)
    assert named == ["a.first", "a.freqs[0]", "a.scale", "a.table", "b.first", "b.table"]
    assert harness.named_by([_recovery("table", "Other")], model, model)[2] == ["table"]
