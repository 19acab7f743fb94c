"""Property-based: random module trees through every flow end bit-identical to a normal build."""
import copy
import math
import os

import pytest
import torch
from compare import assert_matches_reference, loading_ends
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import bufferfix
from bufferfix.flows import FLOWS

KINDS = ["float32", "bfloat16", "float64", "int64", "bool", "expanded", "scalar", "none"]

buffer_specs = st.tuples(
    st.sampled_from(KINDS),
    st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple),  # shape
    st.booleans(),  # persistent
    st.sampled_from([0.5, 1.0, -3.25, 1e-3]),  # scale
    st.booleans(),  # changed in place after registration, inside the constructor
)


def node_specs(children=None):
    return st.tuples(
        st.lists(buffer_specs, max_size=3).map(tuple),
        st.just(()) if children is None else  # (child, built by deepcopy)
        st.lists(st.tuples(children, st.booleans()), max_size=2).map(tuple),
        st.booleans(),  # register a child's buffer on this node too (shared)
        st.booleans(),  # keep a plain attribute aliasing this node's first buffer
    )


trees = st.recursive(node_specs(), node_specs, max_leaves=5)
# CI keeps the example count small; BUFFERFIX_HYPOTHESIS_EXAMPLES=500 for a thorough run.
EXAMPLES = int(os.environ.get("BUFFERFIX_HYPOTHESIS_EXAMPLES", "30"))


def make_tensor(kind, shape, scale):
    count = math.prod(shape)
    if kind in ("float32", "bfloat16", "float64"):
        return (torch.arange(count, dtype=torch.float32).reshape(shape) * scale).to(getattr(torch, kind))
    if kind == "int64":
        return torch.arange(count).reshape(shape) * int(scale * 4)
    if kind == "bool":
        return (torch.arange(count) % 3 == 0).reshape(shape)
    if kind == "expanded":
        return torch.arange(shape[-1]).expand(2, -1)
    return torch.tensor(scale)  # scalar


class Node(nn.Module):
    def __init__(self, spec):
        super().__init__()
        buffers, children, share, alias = spec
        for index, (kind, shape, persistent, scale, in_place) in enumerate(buffers):
            name = "b%d" % index
            tensor = None if kind == "none" else make_tensor(kind, shape, scale)
            self.register_buffer(name, tensor, persistent=persistent and kind != "expanded")
            if in_place and tensor is not None and tensor.is_floating_point():
                getattr(self, name).mul_(2)
        for index, (child_spec, by_deepcopy) in enumerate(children):
            child = Node(child_spec)
            setattr(self, "c%d" % index, copy.deepcopy(child) if by_deepcopy else child)
        if share:
            for child in self.children():
                candidates = [name for name in child._non_persistent_buffers_set if child._buffers[name] is not None]
                if candidates:
                    self.register_buffer("shared", child._buffers[candidates[0]], persistent=False)
                    break
        if alias and self._buffers.get("b0") is not None:
            self.alias = self.b0


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=trees, flow=st.sampled_from(sorted(FLOWS)))
def test_random_trees_match_a_normal_build(spec, flow):
    reference = Node(spec)
    materialised = FLOWS[flow](lambda: Node(spec), reference.state_dict())
    assert_matches_reference(materialised, reference)


@settings(max_examples=max(EXAMPLES // 2, 1), deadline=None)
@given(spec=trees)
def test_changed_after_construction_on_meta_is_reported_not_guessed(spec):
    """An in-place change made after construction on meta is lost; it must be reported."""
    with torch.device("meta"):
        model = Node(spec)
    changed = [(path, name) for path, module in model.named_modules() for name in sorted(module._non_persistent_buffers_set)
               if module._buffers[name] is not None and module._buffers[name].is_floating_point()]
    if not changed:
        return
    path, name = changed[0]
    model.get_submodule(path)._buffers[name].add_(1)
    with pytest.warns(bufferfix.UnrecoverableBufferWarning, match="modified in place"):
        model.to_empty(device="cpu")
        loading_ends()
