"""Issue 14: buffers a constructor computes from a parameter, or on a parameter's device.

timm's Swin ``attn_mask`` is made on ``self.norm1.weight.device``; its ``RotaryEmbeddingMixed``
copies a grid made on the learnable ``freqs``' device into an empty buffer.  A replay that sends
parameters to meta gets the first on meta and raises on the second, and under
``accelerate.init_empty_weights()`` (parameters on meta, buffers real) such a buffer is born on meta
with no recorded constructor.  These stand-ins (torch only, so every CI leg runs them) follow the
same patterns, ``device=`` arguments included, as timm's modules do.

With bufferfix every flow must give the normal build bit for bit, and the replay with real
parameters must hold at most one module's parameters at a time, freed as soon as it returns.
"""
import weakref

import pytest
import torch
from compare import assert_matches_reference, broken_buffers, loading_ends
from torch import nn

from bufferfix.flows import FLOWS

DIM = 64


class MaskOnParameterDevice(nn.Module):
    """Swin's pattern: a buffer made on a parameter's device, from the module's arguments."""

    def __init__(self, dim, shift, device=None):
        super().__init__()
        self.proj = nn.Linear(dim, dim, device=device)
        self.norm = nn.LayerNorm(dim, device=device)
        index = torch.arange(dim, device=self.norm.weight.device)
        mask = (index[:, None] - index[None, :] + shift).remainder(7).eq(0).float() * -100.0
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x):
        return self.proj(self.norm(x)) @ self.mask.softmax(-1)


class GridFromParameterDevice(nn.Module):
    """RotaryEmbeddingMixed's pattern: an empty buffer filled in place from a tensor made on a
    parameter's device (on meta, copying it into a real buffer raises NotImplementedError)."""

    def __init__(self, dim, device=None):
        super().__init__()
        self.freqs = nn.Parameter(torch.randn(dim, device=device))
        self.register_buffer("grid", torch.empty(dim, device=device), persistent=False)
        self.grid.copy_(torch.linspace(0, 1, dim, device=self.freqs.device))

    def forward(self, x):
        return x * (self.grid * self.freqs).cos()


class Model(nn.Module):
    def __init__(self, depth=3, device=None):
        super().__init__()
        self.blocks = nn.ModuleList([MaskOnParameterDevice(DIM, shift, device=device) for shift in range(depth)])
        self.rope = GridFromParameterDevice(DIM, device=device)
        self.head = nn.Linear(DIM, 4 * DIM, device=device)  # the biggest module: never replayed

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(self.rope(x))


def build():
    torch.manual_seed(0)
    return Model()


def built_with_device_argument(build_, state_dict, device="cpu"):
    """``Model(device="meta")`` (timm's create_model(..., device="meta")) -> to_empty -> load."""
    torch.manual_seed(0)
    model = Model(device="meta")
    model.to_empty(device=device)
    model.load_state_dict(state_dict)
    return model


def assign(build_, state_dict, device="cpu"):
    with torch.device("meta"):
        model = build_()
    model.load_state_dict({k: v.clone() for k, v in state_dict.items()}, assign=True)
    return model


ALL_FLOWS = {**FLOWS, "Model(device='meta')": built_with_device_argument, "load_state_dict(assign=True)": assign}
# accelerate.init_empty_weights() keeps buffers real: GridFromParameterDevice's own constructor then
# copies a meta tensor into a real one and raises, with or without bufferfix (as timm's does).
RAISES_IN_THE_CONSTRUCTOR = {"init_empty_weights"}


@pytest.fixture(scope="module")
def reference():
    return build().eval()


def _needs(flow):
    if flow.startswith("init_empty_weights"):
        pytest.importorskip("accelerate")


@pytest.mark.parametrize("flow", ALL_FLOWS)
def test_gives_the_normal_build(flow, reference, recwarn):
    _needs(flow)
    if flow in RAISES_IN_THE_CONSTRUCTOR:
        with pytest.raises(NotImplementedError):
            ALL_FLOWS[flow](build, reference.state_dict())
        return
    model = ALL_FLOWS[flow](build, reference.state_dict()).eval()
    assert_matches_reference(model, reference)
    x = torch.randn(2, DIM, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert not [w for w in recwarn if "bufferfix" in str(w.message)], [str(w.message) for w in recwarn]


@pytest.mark.parametrize("flow", [flow for flow in ALL_FLOWS if flow not in RAISES_IN_THE_CONSTRUCTOR])
def test_broken_without_bufferfix(flow, reference, without_bufferfix):
    _needs(flow)
    model = ALL_FLOWS[flow](build, reference.state_dict())
    assert broken_buffers(model, reference)


def test_init_empty_weights_mask_born_on_meta_comes_back(reference):
    """Under init_empty_weights() only the mask is born on meta (its parameter's device), with no
    meta default device: its constructor must have been recorded all the same."""
    accelerate = pytest.importorskip("accelerate")

    class MaskOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([MaskOnParameterDevice(DIM, shift) for shift in range(3)])

    torch.manual_seed(0)
    normal = MaskOnly()
    with accelerate.init_empty_weights():
        model = MaskOnly()
    assert model.blocks[0].mask.is_meta  # the case at hand
    model.to_empty(device="cpu")
    model.load_state_dict(normal.state_dict())
    assert_matches_reference(model, normal)


def _parameter_bytes(module):
    return sum(p.numel() * p.element_size() for p in module.parameters())


@pytest.mark.parametrize("flow", ["torch.device('meta')", "Model(device='meta')", "to_empty(recurse=False)"])
def test_replay_with_real_parameters_holds_one_module_at_a_time(flow, reference):
    """The transient memory of replaying with real parameters, measured: every real parameter
    created while bufferfix replays is watched; at most one module's worth is alive at any time,
    and none is left once the model is materialised."""
    alive, peak = [], [0]

    def watch(module, name, param):
        if param is not None and not param.is_meta:
            alive.append((weakref.ref(param), param.numel() * param.element_size()))
            peak[0] = max(peak[0], sum(size for ref, size in alive if ref() is not None))

    handle = nn.modules.module.register_module_parameter_registration_hook(watch)
    try:
        model = ALL_FLOWS[flow](build, reference.state_dict())
    finally:
        handle.remove()
    del model
    block = _parameter_bytes(reference.blocks[0])
    replayed = max(block, _parameter_bytes(reference.rope))
    assert 0 < peak[0] <= replayed < _parameter_bytes(reference) / 4
    assert all(ref() is None for ref, _ in alive), "a replay's real parameters outlived it"


class FromRandomParameterValue(nn.Module):
    """A buffer computed from a randomly initialised parameter's *value*: a replay cannot know it."""

    def __init__(self, dim=8):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim))
        self.register_buffer("scale", self.weight.detach().abs() + 1, persistent=False)


def test_a_buffer_from_a_random_parameter_value_is_named_not_guessed():
    """Replaying with real parameters must not turn a random value into a guess: the two-seed
    check sees it differ and bufferfix warns, naming the buffer."""
    import bufferfix

    torch.manual_seed(0)
    normal = FromRandomParameterValue()
    with torch.device("meta"):
        model = FromRandomParameterValue()
    with pytest.warns(bufferfix.UnrecoverableBufferWarning) as caught:
        model.to_empty(device="cpu")
        loading_ends()
    (recovery,) = [r for w in caught for r in w.message.recoveries]
    assert (recovery.name, recovery.reason.name) == ("scale", "RANDOM")
    model.load_state_dict(normal.state_dict())
    assert broken_buffers(model, normal) == ["scale"]
