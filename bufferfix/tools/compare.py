"""Bit-for-bit comparison of a model's buffers with a normally built reference.

Shared by the doctor and the test suite (``tests/compare.py`` builds its assertions on it).
Imports torch.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor: NaN == NaN, and -0.0 != 0.0, unlike torch.equal."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, device, shape and bytes (and not on meta)."""
    return (a.dtype == b.dtype and a.device == b.device and a.shape == b.shape
            and not a.is_meta and torch.equal(bits(a), bits(b)))


def difference(got: torch.Tensor | None, expected: torch.Tensor) -> str:
    """What differs between ``got`` (None: missing) and ``expected``, in words: ``"still on meta"``,
    ``"dtype float16, a normal build has float32"``, ``"3 of 4 values differ (NaN: 3)"``..."""
    if got is None:
        return "missing (a normal build has it)"
    if got.is_meta:
        return "still on meta"
    parts = ["%s %s, a normal build has %s" % (what, ours, theirs) for what, ours, theirs in (
        ("dtype", got.dtype, expected.dtype), ("device", got.device, expected.device),
        ("shape", tuple(got.shape), tuple(expected.shape))) if ours != theirs]
    if parts:
        return "; ".join(parts).replace("torch.", "")
    size = max(got.element_size(), 1)
    unlike = (bits(got).reshape(-1, size) != bits(expected).reshape(-1, size)).any(dim=1)
    text = "%d of %d values differ" % (int(unlike.sum()), got.numel())
    if got.is_floating_point() or got.is_complex():
        nan = int(torch.isnan(got.detach().cpu()).sum())
        text += " (NaN: %d)" % nan if nan else ""
    return text


def qualified(path: str, name: str) -> str:
    """``"layers.0" + "inv_freq"`` -> ``"layers.0.inv_freq"`` (the root module's path is ``""``)."""
    return "%s.%s" % (path, name) if path else name


def non_persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{qualified name: tensor}`` of every non-persistent buffer, shared ones under every name."""
    return {
        qualified(path, name): tensor
        for path, module in model.named_modules(remove_duplicate=False)
        for name, tensor in module._buffers.items()
        if name in module._non_persistent_buffers_set and tensor is not None
    }


def tensor_attributes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{qualified name: tensor}`` of every plain tensor attribute (not a parameter, not a buffer)."""
    return {
        qualified(path, name): value
        for path, module in model.named_modules()
        for name, value in vars(module).items()
        if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter)
    }


def unsaved_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint does not hold: non-persistent buffers, then plain tensor attributes
    (transformers 4.x rotary ``original_inv_freq``)."""
    found = non_persistent_buffers(model)
    for name, tensor in tensor_attributes(model).items():
        found.setdefault(name, tensor)
    return found


def differing(got: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """Names in ``expected`` (``{name: tensor}``) that ``got`` lacks or holds differently."""
    return [name for name, tensor in expected.items() if name not in got or not identical(got[name], tensor)]


def sharing(tensors: Mapping[str, object]) -> dict[str, str]:
    """Which names hold the same tensor object: {name: first name holding that object}."""
    first: dict[int, str] = {}
    return {name: first.setdefault(id(tensor), name) for name, tensor in tensors.items()}
