"""The meta-device flows users run, as plain functions (used by the demo, the tests and
the doctor).  Each takes ``build()`` (a zero-argument callable returning the model) and the
state dict to load, and returns the materialised, loaded model.

They are written exactly as a user would write them; nothing here knows about bufferfix.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

Build = Callable[[], torch.nn.Module]  # builds the model
StateDict = Mapping[str, Any]  # what load_state_dict takes
Flow = Callable[[Build, StateDict], torch.nn.Module]


def _init_empty_weights(include_buffers: bool) -> contextlib.AbstractContextManager[None]:
    try:
        from accelerate import init_empty_weights
    except ImportError:  # pragma: no cover - accelerate is a test extra
        raise RuntimeError("this flow needs accelerate: pip install accelerate") from None
    return init_empty_weights(include_buffers=include_buffers)


def _load(model: torch.nn.Module, state_dict: StateDict, device: torch.device | str) -> torch.nn.Module:
    model.to_empty(device=device)
    model.load_state_dict(state_dict)
    return model


def init_empty_weights(build: Build, state_dict: StateDict, device: torch.device | str = "cpu") -> torch.nn.Module:
    """accelerate.init_empty_weights() (parameters on meta, buffers real) -> to_empty -> load."""
    with _init_empty_weights(False):
        model = build()
    return _load(model, state_dict, device)


def init_empty_weights_with_buffers(build: Build, state_dict: StateDict, device: torch.device | str = "cpu") -> torch.nn.Module:
    """accelerate.init_empty_weights(include_buffers=True) -> to_empty -> load."""
    with _init_empty_weights(True):
        model = build()
    return _load(model, state_dict, device)


def meta_device(build: Build, state_dict: StateDict, device: torch.device | str = "cpu") -> torch.nn.Module:
    """with torch.device("meta") -> to_empty -> load (the PyTorch-documented flow)."""
    with torch.device("meta"):
        model = build()
    return _load(model, state_dict, device)


def moved_to_meta(build: Build, state_dict: StateDict, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A real model moved with .to("meta") (e.g. to free memory) -> to_empty -> load."""
    model = build().to("meta")
    return _load(model, state_dict, device)


def per_module(build: Build, state_dict: StateDict, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Meta build, then to_empty(recurse=False) module by module, as FSDP1's param_init_fn does."""
    with torch.device("meta"):
        model = build()
    for module in model.modules():
        module.to_empty(device=device, recurse=False)
    model.load_state_dict(state_dict)
    return model


FLOWS: dict[str, Flow] = {
    "init_empty_weights": init_empty_weights,
    "init_empty_weights(include_buffers)": init_empty_weights_with_buffers,
    "torch.device('meta')": meta_device,
    ".to('meta')": moved_to_meta,
    "to_empty(recurse=False)": per_module,
}


@contextlib.contextmanager
def uninitialised_memory_is_poisoned() -> Iterator[None]:
    """Make uninitialised memory deterministic garbage (NaN / max int) instead of whatever the
    allocator hands back, which often still holds the right bytes and hides the bug."""
    # Any: the module gives itself this property by replacing its own class, which mypy cannot see
    deterministic: Any = torch.utils.deterministic
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        deterministic.fill_uninitialized_memory = previous[2]
