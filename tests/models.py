"""Hand-written modules with the kinds of non-persistent buffers real models have."""
import copy
import math

import torch
from torch import nn


class Sinusoidal(nn.Module):
    """A sinusoidal position table (as in the original Transformer)."""

    def __init__(self, positions, dim):
        super().__init__()
        position = torch.arange(positions, dtype=torch.float32).unsqueeze(1)
        frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
        table = torch.zeros(positions, dim)
        table[:, 0::2] = torch.sin(position * frequency)
        table[:, 1::2] = torch.cos(position * frequency)
        self.register_buffer("table", table, persistent=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(x + self.table[: x.shape[-2]])


class Alibi(nn.Module):
    """ALiBi slopes built from a Python list."""

    def __init__(self, heads):
        super().__init__()
        start = 2 ** (-(2 ** -(math.log2(heads) - 3)))
        self.register_buffer("slopes", torch.tensor([start ** (i + 1) for i in range(heads)]), persistent=False)


class CausalMask(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.register_buffer("mask", torch.tril(torch.ones(size, size, dtype=torch.bool)), persistent=False)


class ScaledAfterRegistration(nn.Module):
    def __init__(self, size, scale=3.0):
        super().__init__()
        self.register_buffer("values", torch.linspace(0, 1, size), persistent=False)
        self.values.mul_(scale)  # in place, after registration
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))  # persistent


class Signature(nn.Module):
    """``*args``, keyword-only and ``**kwargs`` in the constructor."""

    def __init__(self, *dims, scale, **options):
        super().__init__()
        offset = options.get("offset", 0.0)
        self.register_buffer("grid", torch.arange(math.prod(dims), dtype=torch.float32).reshape(dims) * scale + offset,
                             persistent=False)


class PositionIds(nn.Module):
    def __init__(self, positions):
        super().__init__()
        self.register_buffer("position_ids", torch.arange(positions).expand((1, -1)), persistent=False)
        self.embed = nn.Embedding(positions, 4)

    def forward(self):
        return self.embed(self.position_ids)


class Rotary(nn.Module):
    """A rotary embedding that, like transformers 4.x, keeps an attribute aliasing its buffer."""

    def __init__(self, dim, base=10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.original_inv_freq = self.inv_freq


class Layer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.rotary = Rotary(dim)


class Zoo(nn.Module):
    """Every kind above in one model, with deep-copied layers, a root buffer and a shared buffer."""

    def __init__(self, dim=8, layers=3):
        super().__init__()
        self.sinusoidal = Sinusoidal(16, dim)
        self.alibi = Alibi(8)
        self.mask = CausalMask(6)
        self.scaled = ScaledAfterRegistration(5)
        self.signature = Signature(2, 3, scale=0.5, offset=1.0)
        self.positions = PositionIds(10)
        template = Layer(dim)
        self.layers = nn.ModuleList([copy.deepcopy(template) for _ in range(layers)])
        self.register_buffer("root_scale", torch.tensor([0.125, 2.5]), persistent=False)
        self.shared_a = CausalMask(4)
        self.shared_b = nn.Module()
        self.shared_b.register_buffer("mask", self.shared_a.mask, persistent=False)


class OnTorchChildren(nn.Module):
    """The parent gives torch.nn modules a non-persistent buffer and a plain tensor attribute.

    bufferfix does not record the constructions of torch.nn's own classes (their constructors
    make neither); what a parent puts on them must come from replaying the parent.
    """

    def __init__(self, dim=4):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(dim, dim) for _ in range(2)])
        for index, block in enumerate(self.blocks):
            block.register_buffer("scale", torch.full((dim,), 0.5 + index), persistent=False)
        self.norm = nn.LayerNorm(dim)
        self.norm.offsets = torch.arange(dim, dtype=torch.float32)
