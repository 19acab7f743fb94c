"""``bufferfix.check(build)``: every flow run on the model and compared bit for bit with a normal build;
its verdicts checked against what the flows really do."""
import sys

import pytest
import torch
from compare import identical, non_persistent_buffers, tensor_attributes
from models import Rotary
from torch import nn

import bufferfix
from bufferfix.flows import FLOWS
from bufferfix.tools.check import FLOW_NAMES, FROM_PRETRAINED, CheckReport, Problem
from bufferfix.tools.compare import difference

try:
    import accelerate  # the init_empty_weights flows
except ImportError:
    accelerate = None
needs_accelerate = pytest.mark.skipif(accelerate is None, reason="needs accelerate")


class RandomTable(nn.Module):
    """A buffer filled from torch.randn in the constructor: no build on meta can know its values."""

    def __init__(self):
        super().__init__()
        self.register_buffer("noise", torch.randn(4, 4), persistent=False)
        self.register_buffer("steps", torch.arange(4.0), persistent=False)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.rotary = Rotary(8)
        self.table = RandomTable()


def broken_unpatched(build, flow):
    """What ``flow`` really gets wrong with bufferfix off, measured here."""
    torch.manual_seed(0)
    reference = build()
    with bufferfix.disabled():
        torch.manual_seed(0)
        materialised = FLOWS[flow](build, reference.state_dict())
    ours = {**non_persistent_buffers(materialised), **tensor_attributes(materialised)}
    theirs = {**non_persistent_buffers(reference), **tensor_attributes(reference)}
    return {name for name in theirs if name not in ours or not identical(ours[name], theirs[name])}


def by_flow(report):
    found = {}
    for problem in report.problems:
        found.setdefault(problem.flow, set()).add(problem.name)
    return found


@needs_accelerate
def test_a_rotary_module_is_ok_in_every_flow():
    report = bufferfix.check(lambda: Rotary(8))
    assert isinstance(report, CheckReport)
    assert report.ok and report.problems == () and report.patched
    assert report.flows == tuple(FLOW_NAMES[key] for key in FLOWS) and dict(report.not_checked) == {}
    assert set(report.tensors) == {"inv_freq", "original_inv_freq"}
    assert str(report).startswith("Rotary, bufferfix on: OK: ")


@needs_accelerate
def test_a_buffer_drawn_from_torch_randn_is_named():
    report = bufferfix.check(Model)
    assert not report.ok
    assert {problem.name for problem in report.problems} == {"table.noise"}  # the rotary and steps are exact
    meta = [problem for problem in report.problems if problem.flow == FLOW_NAMES["torch.device('meta')"]]
    [problem] = meta
    assert (problem.module, problem.tensor) == ("table", "noise")
    assert problem.recovery is not None and problem.recovery.reason is bufferfix.Reason.RANDOM
    assert "random number generator" in problem.what
    text = str(report)
    assert "table.noise" in text and FLOW_NAMES["torch.device('meta')"] in text
    # .to('meta') keeps a snapshot of the real tensor: even the random buffer comes back
    assert FLOW_NAMES[".to('meta')"] not in by_flow(report)
    with pytest.raises(AssertionError, match="table.noise"):
        assert report.ok, report


@needs_accelerate
def test_unpatched_shows_what_the_flows_do_on_their_own():
    was = torch.get_rng_state()
    report = bufferfix.check(lambda: Rotary(8), patched=False)
    assert not report.ok and not report.patched
    assert bufferfix.is_enabled()  # switched back on
    assert torch.equal(torch.get_rng_state(), was)
    found = by_flow(report)
    for key in FLOWS:
        assert found.get(FLOW_NAMES[key], set()) == broken_unpatched(lambda: Rotary(8), key), key
    assert "inv_freq" in found[FLOW_NAMES["torch.device('meta')"]]
    assert all(problem.recovery is None for problem in report.problems)  # bufferfix said nothing: it was off


def test_flows_whose_package_is_missing_are_named_not_checked(monkeypatch):
    monkeypatch.setitem(sys.modules, "accelerate", None)  # as if not installed: importing it raises ImportError
    report = bufferfix.check(lambda: Rotary(8))
    skipped = [FLOW_NAMES["init_empty_weights"], FLOW_NAMES["init_empty_weights(include_buffers)"]]
    assert list(report.not_checked) == skipped
    assert all("accelerate is not installed" in why for why in report.not_checked.values())
    assert report.ok and len(report.flows) == len(FLOWS) - 2 and not set(skipped) & set(report.flows)
    text = str(report)
    assert "in each of the 3 flow(s) run" in text and text.count("not checked: init_empty_weights") == 2


class NeedsRealTensors(nn.Module):
    def __init__(self):
        super().__init__()
        size = int(torch.arange(3).sum().item())  # raises on meta: a meta tensor has no data
        self.register_buffer("table", torch.arange(float(size)), persistent=False)


def test_a_flow_that_raises_is_a_problem_of_the_flow():
    report = bufferfix.check(NeedsRealTensors)
    raised = {problem.flow: problem for problem in report.problems if problem.tensor is None}
    assert FLOW_NAMES["torch.device('meta')"] in raised and not report.ok
    problem = raised[FLOW_NAMES["torch.device('meta')"]]
    assert problem.module is None and problem.name is None and problem.what.startswith("raised ")
    assert FLOW_NAMES[".to('meta')"] not in raised  # built normally, then moved: fine


def test_the_normal_build_raising_or_not_a_module():
    def fails():
        raise RuntimeError("needs a GPU")

    with pytest.raises(RuntimeError, match="needs a GPU"):
        bufferfix.check(fails)
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        bufferfix.check(lambda: 42)


def test_switched_off_before_it_is_switched_off_after():
    bufferfix.disable()
    try:
        report = bufferfix.check(lambda: Rotary(8))
        assert report.patched and not bufferfix.is_enabled()
        assert all("inv_freq" not in (problem.name or "") for problem in report.problems)
    finally:
        bufferfix.enable()


def test_from_pretrained_is_checked_for_a_transformers_model():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import cli_targets

    patched = bufferfix.check(cli_targets.custom_pretrained_model)
    assert patched.ok and FROM_PRETRAINED in patched.flows
    unpatched = bufferfix.check(cli_targets.custom_pretrained_model, patched=False)
    # transformers 5 leaves a custom buffer its _init_weights does not know garbage (transformers issue 48892);
    # transformers 4 keeps buffers real in from_pretrained
    garbage = int(transformers.__version__.split(".")[0]) >= 5
    assert ("scale" in by_flow(unpatched).get(FROM_PRETRAINED, set())) == garbage


def test_problem_and_difference_words():
    assert str(Problem("flow", "a.b", "mask", "still on meta")) == "flow: a.b.mask: still on meta"
    assert Problem("flow", "", "mask", "x").name == "mask" and Problem("flow", None, None, "raised X").name is None
    expected = torch.tensor([1.0, 2.0, 3.0, -0.0])
    assert difference(None, expected) == "missing (a normal build has it)"
    assert difference(torch.empty(4, device="meta"), expected) == "still on meta"
    assert difference(expected.half(), expected) == "dtype float16, a normal build has float32"
    assert difference(torch.tensor([1.0, float("nan"), 3.0, 0.0]), expected) == "2 of 4 values differ (NaN: 1)"
