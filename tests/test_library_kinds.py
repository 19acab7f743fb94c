"""Issue 14's kinds of unsaved tensors, in torch-only modules (the library sweeps show them in the real
libraries): tensors in container attributes (diffusers Lumina2 / ConsistencyDecoderVAE), buffers a
constructor registers only off meta (torchtune's rope_init()), and legacy weight-norm attributes
(diffusers' audio VAEs), each through every meta flow, bit for bit against a normal build.
"""
import math
import warnings

import pytest
import torch
from compare import loading_ends
from sweeps import harness as libsweep
from torch import nn

import bufferfix
from bufferfix.mechanism import recompute as missing_rules


class ListOfTables(nn.Module):
    """RoPE tables in a list attribute, as diffusers' Lumina2 keeps them."""

    def __init__(self, dims=(4, 6), positions=8):
        super().__init__()
        self.proj = nn.Linear(sum(dims), sum(dims))
        self.freqs = [torch.outer(torch.arange(positions, dtype=torch.float32),
                                  1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)) for d in dims]
        self.by_name = {"first": self.freqs[0], "scale": torch.tensor(0.5)}  # shares a tensor with the list

    def forward(self, x):
        return self.proj(x) * self.by_name["scale"] + torch.cat([f.sum(0) for f in self.freqs]).sum()


class Schedule:
    """A plain object holding tensors (a diffusers scheduler)."""

    def __init__(self, steps):
        self.betas = torch.linspace(1e-4, 0.02, steps)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)


class HoldsASchedule(nn.Module):
    def __init__(self, steps=10):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.schedule = Schedule(steps)

    def forward(self, x):
        return self.proj(x) * self.schedule.alphas_cumprod[3]


class Settings:
    """A config-like plain object without tensors, held by every module (as transformers' configs are)."""

    def __init__(self):
        self.hidden, self.options = 4, {"scale": 2.0, "names": ["a", "b"]}


class HoldsATuple(nn.Module):
    def __init__(self, settings):
        super().__init__()
        self.settings = settings
        self.proj = nn.Linear(4, 4)
        self.tables = (torch.arange(4.0), torch.ones(2))

    def forward(self, x):
        return self.proj(x) * self.tables[0]


class SharesObjects(nn.Module):
    """Every module holds the same tensor-free settings (walked once per plan: containers.slots),
    and each its own tuple of tensors, found and filled per module all the same."""

    def __init__(self):
        super().__init__()
        self.settings = Settings()
        self.first = HoldsATuple(self.settings)
        self.second = HoldsATuple(self.settings)

    def forward(self, x):
        return self.first(x) + self.second(x) * self.second.tables[1][0]


class RopeInitOffMeta(nn.Module):
    """Registers its buffers in rope_init(), which returns early on meta (torchtune's Llama3ScaledRoPE)."""

    def __init__(self, dim=8, positions=16):
        super().__init__()
        self.dim, self.positions, self.is_cache_built = dim, positions, False
        self.rope_init()

    def rope_init(self):
        theta = 1.0 / (10000 ** (torch.arange(0, self.dim, 2).float() / self.dim))
        if theta.is_meta:
            return
        self.register_buffer("theta", theta, persistent=False)
        self.register_buffer("cache", torch.outer(torch.arange(self.positions).float(), theta), persistent=False)
        self.is_cache_built = True

    def forward(self, x):
        if not self.is_cache_built:
            raise RuntimeError("RoPE cache is not built")
        return x + self.cache[: x.shape[-2], : x.shape[-1]].sum()


class WithRope(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.rope = RopeInitOffMeta()

    def forward(self, x):
        return self.rope(self.proj(x))


class WeightNormed(nn.Module):
    """Legacy weight norm: ``weight`` is a plain attribute its forward pre-hook recomputes."""

    def __init__(self):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.conv = nn.utils.weight_norm(nn.Conv1d(2, 2, 3, padding=1))
        self.register_buffer("window", torch.hann_window(4), persistent=False)

    def forward(self, x):
        return self.conv(x) * self.window.sum()


def _expect_rope_init(cls):
    return cls is RopeInitOffMeta


@pytest.fixture(autouse=True)
def rope_init_expected():
    """What the torchtune integration does for torchtune's classes, for this test's own class."""
    missing_rules.expect_buffers(_expect_rope_init)
    yield
    missing_rules.forget_expectation(_expect_rope_init)


CASES = {
    "list / dict of tensors": libsweep.Case("ListOfTables", ListOfTables, inputs=lambda m: dict(x=torch.ones(2, 10))),
    "tensors in a plain object": libsweep.Case("HoldsASchedule", HoldsASchedule,
                                               inputs=lambda m: dict(x=torch.ones(2, 4))),
    "a plain object shared by modules": libsweep.Case("SharesObjects", SharesObjects,
                                                      inputs=lambda m: dict(x=torch.ones(2, 4))),
    "buffers registered only off meta": libsweep.Case("WithRope", WithRope, inputs=lambda m: dict(x=torch.ones(2, 4))),
}


@pytest.mark.parametrize("kind", CASES)
def test_exact_with_bufferfix_in_every_flow(kind):
    libsweep.assert_exact_with_bufferfix(libsweep.check(CASES[kind], without_bufferfix=False))


@pytest.mark.parametrize("kind", CASES)
def test_broken_without_bufferfix(kind):
    result = libsweep.check(CASES[kind], with_bufferfix=False)
    assert libsweep.has_unsaved(result)
    assert result.broken(enabled=False)


def test_weight_norm_attributes_are_no_lost_buffers():
    """The weight is derived from weight_g / weight_v: never named in a warning, and the value the
    forward sees is exact (the window buffer beside it is recovered as usual)."""
    result = libsweep.check(libsweep.Case("WeightNormed", WeightNormed, inputs=lambda m: dict(x=torch.ones(1, 2, 4))))
    libsweep.assert_exact_with_bufferfix(result)
    assert result.broken(enabled=False)  # the window buffer: the case can fail


def test_a_container_tensor_no_replay_can_give_is_named(strict):
    """A tensor in a container, born on meta, whose module's constructor cannot be re-run: loud."""

    class TakesAModule(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.tables = [torch.arange(4.0)]

    with torch.device("meta"):
        model = TakesAModule(nn.Linear(2, 2))
    with pytest.raises(bufferfix.UnrecoverableBufferError) as raised:
        model.to_empty(device="cpu")
        loading_ends()
    assert [recovery.name for recovery in raised.value.recoveries] == ["tables[0]"]


def test_normal_builds_are_not_touched():
    model = ListOfTables()
    tables = list(model.freqs)
    model.to_empty(device="cpu")
    assert all(a is b for a, b in zip(model.freqs, tables))  # real all along: left alone
    assert not math.isnan(float(model.freqs[0].sum()))
