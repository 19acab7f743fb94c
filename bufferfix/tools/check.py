"""``bufferfix.check(build)``: does every meta-device flow give a model's non-persistent buffers back?

For library maintainers' and users' own test suites:

```python
import bufferfix

def test_non_persistent_buffers_survive_meta_flows():
    report = bufferfix.check(lambda: MyModel(MyConfig()))
    assert report.ok, report
```

``build`` is a zero-argument callable returning the model.  ``check`` builds it normally once
(the reference), then runs every flow of ``bufferfix.flows.FLOWS`` (and ``save_pretrained`` ->
``from_pretrained`` for a transformers model) and compares each materialised model's
non-persistent buffers and plain tensor attributes with the reference, bit for bit (value, dtype,
device).  Uninitialised memory is poisoned (NaN / max-int) while the flows run, so a lost buffer
never matches by luck.  ``patched=False`` runs the same flows with bufferfix switched off
(``bufferfix.disabled()``): what the library does on its own.

The doctor (``bufferfix doctor``) is built on ``measure``, the same measurement with the
details it prints.

Importing this module does not import torch; running a check does.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeGuard

from ..recovery import Recovery
from .errors import one_line

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

FROM_PRETRAINED = "save_pretrained → from_pretrained"

# Each flow of bufferfix.flows.FLOWS named by all its steps, as the tools show it.
FLOW_NAMES = {
    "init_empty_weights": "init_empty_weights() → to_empty → load",
    "init_empty_weights(include_buffers)": "init_empty_weights(include_buffers=True) → to_empty → load",
    "torch.device('meta')": "torch.device('meta') → to_empty → load",
    ".to('meta')": "normal build → .to('meta') → to_empty → load",
    "to_empty(recurse=False)": "torch.device('meta') → to_empty(recurse=False) → load",
}

# Flows that need a package bufferfix does not install: flow key -> module.
_NEEDS: dict[str | None, str] = {  # None: save_pretrained -> from_pretrained, which needs nothing more
    "init_empty_weights": "accelerate", "init_empty_weights(include_buffers)": "accelerate"}


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing a flow got wrong."""

    flow: str
    """The flow, named by all its steps (``"torch.device('meta') → to_empty → load"``)."""
    module: str | None
    """Path of the module holding the tensor (``""``: the model itself); ``None``: the flow as a whole."""
    tensor: str | None
    """The buffer or tensor attribute on that module; ``None``: the flow as a whole (it raised)."""
    what: str
    """What differs from a normal build, or why bufferfix cannot recover the value, or what the flow raised."""
    recovery: Recovery | None = None
    """bufferfix's own account when it named the tensor unrecoverable (``.reason`` says why), else ``None``."""

    @property
    def name(self) -> str | None:
        """The tensor's qualified name in the model (``"layers.0.rotary.inv_freq"``), or ``None``."""
        if self.tensor is None:
            return None
        return "%s.%s" % (self.module, self.tensor) if self.module else self.tensor

    def __str__(self) -> str:
        return "%s: %s: %s" % (self.flow, self.name or "the flow", self.what)


@dataclasses.dataclass(frozen=True)
class CheckReport:
    """What ``bufferfix.check`` found.  ``assert report.ok, report`` explains itself."""

    model: str
    """The class name of the model ``build()`` returned."""
    patched: bool
    """Whether bufferfix was on while the flows ran."""
    tensors: tuple[str, ...]
    """The non-persistent buffers and plain tensor attributes of a normal build: what was compared."""
    flows: tuple[str, ...]
    """The flows that ran, named by all their steps."""
    not_checked: Mapping[str, str]
    """Flows that did not run -> why (a package they need is not installed)."""
    problems: tuple[Problem, ...]
    """Every tensor a flow got wrong, and every flow that raised."""

    @property
    def ok(self) -> bool:
        """No problem in any flow that ran (and at least one ran).  :attr:`not_checked` lists the others."""
        return not self.problems and bool(self.flows)

    def __str__(self) -> str:
        head = "%s, bufferfix %s: " % (self.model, "on" if self.patched else "off")
        if self.ok:
            head += ("OK: its %d non-persistent buffer(s) and tensor attribute(s) are identical to a normal build's "
                     "in each of the %d flow(s) run" % (len(self.tensors), len(self.flows)))
        else:
            head += "%d problem(s) in %d flow(s) run" % (len(self.problems), len(self.flows))
        lines = [head]
        lines += ["  - %s" % problem for problem in self.problems]
        lines += ["  not checked: %s: %s" % (flow, why) for flow, why in self.not_checked.items()]
        return "\n".join(lines)


# --------------------------------------------------------------------------- the measurement

class NotAModule(TypeError):
    """``build()`` returned something that is not a ``torch.nn.Module``."""


@dataclasses.dataclass
class FlowResult:
    """One flow, measured (the doctor's raw material)."""

    not_checked: str | None = None  # why the flow did not run
    error: str | None = None  # the flow raised: one line
    differing: list[str] = dataclasses.field(default_factory=list)  # tensors unlike the normal build's
    differences: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> what differs
    unrecoverable: list[Recovery] = dataclasses.field(default_factory=list)  # named by bufferfix's warnings
    other_warnings: list[str] = dataclasses.field(default_factory=list)  # bufferfix warnings about no tensor


@dataclasses.dataclass
class Measurement:
    model: str
    tensors: list[str]  # what a normal build has (and a flow must give back)
    flows: dict[str, FlowResult]  # flow name (all its steps) -> result
    random: list[str]  # tensors two normal builds with different seeds disagree on (measured on request)


def _fresh_build(build: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    """``build()`` with the RNG seeded: a random buffer is then the same in the reference and in a
    flow's build (the ``.to('meta')`` flow can give it back from a snapshot)."""
    import torch

    torch.manual_seed(seed)
    return build()


def _missing_package(flow: str | None) -> str | None:
    module = _NEEDS.get(flow)
    if module is None:
        return None
    try:
        importlib.import_module(module)
    except ImportError:
        return "%s is not installed (pip install %s)" % (module, module)
    return None


def _is_transformers_model(model: object) -> TypeGuard[PreTrainedModel]:
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


# reference: Any, since it is saved only where model_class applies: a transformers model then
def _from_pretrained(model_class: type[PreTrainedModel], reference: Any, directory: str | None = None
                     ) -> PreTrainedModel:
    import torch

    if directory is not None:
        return model_class.from_pretrained(directory, dtype=torch.get_default_dtype())
    with tempfile.TemporaryDirectory() as saved:
        reference.save_pretrained(saved)
        return model_class.from_pretrained(saved, dtype=torch.get_default_dtype())


def _bufferfix_warnings(caught: list[warnings.WarningMessage], result: FlowResult) -> None:
    import bufferfix

    for warning in caught:
        if not issubclass(warning.category, bufferfix.BufferFixWarning):
            continue
        recoveries = getattr(warning.message, "recoveries", ())
        result.unrecoverable += [recovery for recovery in recoveries if recovery not in result.unrecoverable]
        if not recoveries:
            result.other_warnings.append(str(warning.message).strip().splitlines()[0])


@contextlib.contextmanager
def _bufferfix(patched: bool) -> Iterator[None]:
    """bufferfix on (``patched``) or off inside the block, as it was after."""
    import bufferfix

    if not patched:
        with bufferfix.disabled():
            yield
        return
    if bufferfix.is_enabled():
        yield
        return
    if not bufferfix.enable():
        raise RuntimeError("bufferfix cannot be switched on here (BUFFERFIX_DISABLE is set): nothing to check")
    try:
        yield
    finally:
        bufferfix.disable()


def measure(build: Callable[[], torch.nn.Module], *, patched: bool,
            model_class: type[PreTrainedModel] | None = None, pretrained_dir: str | None = None,
            find_random: bool = False, built: Callable[[torch.nn.Module], object] = lambda model: None) -> Measurement:
    """Run every flow on ``build()`` with bufferfix on (``patched``) or off, in this interpreter.

    ``model_class``: a transformers class whose ``from_pretrained`` applies (default: the model's own
    class when it is a transformers model); ``pretrained_dir``: load from there instead of a saved
    normal build.  ``built(reference)`` is called once the normal build has worked.  The normal
    build's exceptions propagate; the RNG state and bufferfix's state are as they were after."""
    import torch

    from bufferfix import flows

    from .compare import difference, differing, unsaved_tensors

    with torch.random.fork_rng(devices=[]), _bufferfix(patched):
        reference = _fresh_build(build, 0)
        if not isinstance(reference, torch.nn.Module):
            raise NotAModule("build() returned a %s, not a torch.nn.Module" % type(reference).__name__)
        built(reference)
        expected = unsaved_tensors(reference)
        random = differing(unsaved_tensors(_fresh_build(build, 1)), expected) if find_random else []
        state_dict = reference.state_dict()
        runs: dict[str, tuple[str | None, Callable[[], Any]]] = {
            FLOW_NAMES[key]: (key, functools.partial(flow, lambda: _fresh_build(build, 0), state_dict))
            for key, flow in flows.FLOWS.items()}
        if model_class is None and _is_transformers_model(reference):
            model_class = type(reference)
        if model_class is not None:
            runs[FROM_PRETRAINED] = (None, lambda: _from_pretrained(model_class, reference, pretrained_dir))
        results: dict[str, FlowResult] = {}
        with flows.uninitialised_memory_is_poisoned():
            for name, (key, run) in runs.items():
                result = results[name] = FlowResult(not_checked=_missing_package(key))
                if result.not_checked:
                    continue
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        model = run()
                    except Exception as error:  # noqa: BLE001 - recorded: the flow raised
                        result.error = one_line(error)
                        model = None
                _bufferfix_warnings(caught, result)
                if model is not None:
                    got = unsaved_tensors(model)
                    result.differing = differing(got, expected)
                    result.differences = {name: difference(got.get(name), expected[name])
                                          for name in result.differing}
                    del model
    return Measurement(type(reference).__name__, list(expected), results, random)


def problems(measurement: Measurement) -> list[Problem]:
    """Every problem of a measurement, flow by flow, each tensor once per flow."""
    from bufferfix import reporting

    found: list[Problem] = []
    for flow, result in measurement.flows.items():
        if result.error is not None:
            found.append(Problem(flow, None, None, "raised %s" % result.error))
        named: dict[str, Recovery] = {}
        for recovery in result.unrecoverable:
            named.setdefault(recovery.name, recovery)
        for name in list(named) + [name for name in result.differing if name not in named]:
            known = named.get(name)
            what = ("bufferfix cannot recover it: %s" % reporting.explanation(known) if known is not None
                    else result.differences.get(name, "differs from a normal build"))
            module, _, tensor = name.rpartition(".")
            found.append(Problem(flow, module, tensor, what, known))
        found += [Problem(flow, None, None, "bufferfix warned: %s" % text) for text in result.other_warnings]
    return found


def check(build: Callable[[], torch.nn.Module], *, patched: bool = True) -> CheckReport:
    """The implementation of ``bufferfix.check`` (see there)."""
    measurement = measure(build, patched=patched)
    return CheckReport(
        model=measurement.model, patched=patched, tensors=tuple(measurement.tensors),
        flows=tuple(name for name, result in measurement.flows.items() if result.not_checked is None),
        not_checked={name: result.not_checked for name, result in measurement.flows.items() if result.not_checked},
        problems=tuple(problems(measurement)))
