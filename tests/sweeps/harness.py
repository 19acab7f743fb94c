"""The one sweep harness: a library's models, each built normally and through every meta flow, with
and without bufferfix, compared bit for bit with the normal build.

A sweep is a :class:`Library`: a name, its version and a list of :class:`Case`.  A case is a name, a
zero-argument ``build`` (tiny dims, nothing downloaded), an optional generic input and the library's
own loading paths (:class:`Flow`).  :func:`check` builds a normal reference (``torch.manual_seed(0)``,
bufferfix switched off: the reference owes nothing to it) and runs every flow of
:data:`bufferfix.flows.FLOWS`, ``meta -> load_state_dict(assign=True)`` and the library's paths, once
with bufferfix and once without, under poisoned uninitialised memory (a lost value reads as NaN /
max-int and never passes by luck).

:func:`differences` is the one comparison.  It compares bit for bit (value, dtype, device, shape):

- non-persistent buffers, under every name a shared module gives them;
- plain tensor attributes of modules;
- tensors held in container attributes: lists / tuples / dicts of tensors on a module, tensors inside
  a plain object a module holds (a scheduler), up to four levels deep;
- which of all these (and of the persistent buffers) share one tensor object;
- the state dict;
- and, where the case has a generic input, the outputs of a forward pass.

Two more kinds are found and reported in the summary, not judged (:data:`REPORTED`), because the
mechanism does not keep them yet: ``storage``, which unsaved tensors share storage (a buffer
registered as a view of another: PEFT OFT's ``rows`` / ``cols``), and ``stale``, the legacy
``torch.nn.utils.weight_norm`` ``weight`` attributes whose stored value is not what their forward
pre-hook computes from ``weight_g`` / ``weight_v`` (the hook recomputes it before every forward, so
it is compared as the forward sees it).  Judging one is moving it into :data:`TENSOR_KINDS`.

:meth:`Result.verdicts` is the one judgement: for each thing a flow gets wrong with bufferfix, whether
a bufferfix warning names it (``named``) or nothing does (``silent``); everything not listed is
exact.  A tensor is named when a warning's :class:`bufferfix.Recovery` gives its path in the model
(or the path of another name of the same tensor object), or a placeholder on the module holding it
(``path.<buffers registered off meta>``), or a name relative to a submodule of the owner class the
warning gives (listed apart in the summary: such a name does not locate the tensor by itself).
"""
import argparse
import contextlib
import dataclasses
import gc
import json
import os
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable

import torch

import bufferfix
from bufferfix.flows import FLOWS, uninitialised_memory_is_poisoned
from bufferfix.tools.compare import identical, non_persistent_buffers, qualified, sharing, tensor_attributes

ASSIGN = "load_state_dict(assign=True)"
TIME_LIMIT_S = 240  # per case, everything included
MEMORY_LIMIT = 4 * 2**30  # per case: more address space than this and its allocations fail
TENSOR_KINDS = ("buffer", "attribute", "container", "sharing", "state")  # what problems() judges, and "output"
REPORTED = {  # what differences() also finds and the summary reports, not judged (see the module docstring)
    "storage": "unsaved tensors sharing storage otherwise than in the normal build (views, aliases)",
    "stale": "weight-norm attributes stale until the first forward",
}
SHOWN = 8  # names shown per kind in a description


# --------------------------------------------------------------------------- what a sweep is made of

@dataclasses.dataclass(frozen=True)
class Flow:
    """A way to materialise and load a model: ``load(build, reference) -> model``."""

    load: Callable
    from_files: bool = False  # loads a saved directory (outputs may differ by the files' alignment: see problems())
    fixes: str | None = None  # a library's own manual fix of that flow: measured in full without bufferfix too


def _generic(function):
    return Flow(lambda build, reference: function(build, reference.state_dict()))


def assign_flow(build, state_dict, device="cpu"):
    """Built on meta, then ``load_state_dict(..., assign=True)``: never given to ``to_empty``."""
    with torch.device("meta"):
        model = build()
    model.load_state_dict({name: tensor.to(device, copy=True) for name, tensor in state_dict.items()}, assign=True)
    return model


GENERIC_FLOWS = {name: _generic(function) for name, function in dict(FLOWS, **{ASSIGN: assign_flow}).items()}


class Skip(Exception):
    """Raised by a case's ``build``: the case cannot be built, for the reason given (the message)."""


class NoInput(Exception):
    """Raised by a case's ``inputs``: no generic input fits this model (the message says why)."""


@dataclasses.dataclass
class Case:
    name: str
    build: Callable  # () -> nn.Module, unseeded (check() seeds it); may raise Skip
    inputs: Callable | None = None  # (model) -> forward keyword arguments, or a list of them tried in order
    loaders: dict = dataclasses.field(default_factory=dict)  # the library's own paths: flow name -> Flow
    forward: Callable | None = None  # (model, inputs) -> output; default model(**inputs)
    flows: list | None = None  # default: every generic flow, then the loaders
    group: str | None = None  # a family of models (timm.models.<module>), for the summary
    level: Callable | None = None  # () -> how far the config was shrunk, read once the case is built
    quick_flows: list | None = None  # nothing unsaved in the normal build: only these flows, tensors only
    outputs_in: list | None = None  # the flows whose outputs are compared (default all)
    time_limit_s: int = TIME_LIMIT_S
    memory_limit: int | None = MEMORY_LIMIT

    def all_flows(self):
        table = dict(GENERIC_FLOWS, **self.loaders)
        return {name: table[name] for name in (self.flows or table)}


@dataclasses.dataclass
class Library:
    """One library's sweep."""

    name: str
    cases: Callable  # () -> [Case]
    version: Callable  # () -> "diffusers 0.42.1, torch 2.13.0"
    skip_category: Callable | None = None  # (reason) -> a category for the summary
    extra: Callable | None = None  # (results) -> more summary lines
    quiet: Callable | None = None  # () -> None: the library's own logging turned down (command line only)


# --------------------------------------------------------------------------- tensors

# nn.Module's own containers (its flags, such as ``training``, are compared like any attribute)
_MODULE_INTERNALS = frozenset(name for name, value in vars(torch.nn.Module()).items() if isinstance(value, (dict, set)))
_DEPTH = 4


def _walk(value, name, found, seen, depth):
    if isinstance(value, torch.Tensor):
        found.setdefault(name, value)
        return
    if depth == 0 or isinstance(value, (torch.nn.Module, str, bytes, int, float, bool, type(None), type)) \
            or callable(value) and not hasattr(value, "__dict__") or id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, dict):
        for key, item in list(value.items()):
            _walk(item, "%s[%r]" % (name, key), found, seen, depth - 1)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _walk(item, "%s[%d]" % (name, index), found, seen, depth - 1)
    elif hasattr(value, "__dict__") and not callable(value) and type(value).__module__ != "builtins":
        for key, item in list(vars(value).items()):
            _walk(item, "%s.%s" % (name, key), found, seen, depth - 1)


def container_tensors(model, where=None):
    """``{name: tensor}`` of tensors a module reaches through a list, tuple, dict or plain object
    attribute (not parameters, buffers, submodules or direct tensor attributes), e.g.
    ``transformer.freqs[0]`` or ``decoder.scheduler.alphas_cumprod``.  ``where``: a dict that gets
    ``{name: path of the module holding it}``."""
    found = {}
    for path, module in model.named_modules():
        seen = set()
        for name, value in vars(module).items():
            if name in _MODULE_INTERNALS or isinstance(value, (torch.Tensor, torch.nn.Module)):
                continue
            before = len(found)
            _walk(value, qualified(path, name), found, seen, _DEPTH)
            if where is not None and len(found) > before:
                where.update((key, path) for key in list(found)[before:])
    return found


def unsaved(model):
    """Everything a checkpoint does not hold, by kind: ``{"buffer": {name: tensor}, "attribute": ...,
    "container": ...}``."""
    return {"buffer": non_persistent_buffers(model), "attribute": tensor_attributes(model),
            "container": container_tensors(model)}


def _everything(model):
    return {**{"buffer " + k: v for k, v in model.named_buffers(remove_duplicate=False)},
            **{"attribute " + k: v for k, v in tensor_attributes(model).items()},
            **{"container " + k: v for k, v in container_tensors(model).items()}}


def _weight_norm_attributes(model):
    """``[(name, module, hook)]`` of every legacy ``torch.nn.utils.weight_norm`` attribute."""
    from torch.nn.utils.weight_norm import WeightNorm

    return [(qualified(path, hook.name), module, hook) for path, module in model.named_modules()
            for hook in list(module._forward_pre_hooks.values()) if isinstance(hook, WeightNorm)]


def refresh_weight_norm(model):
    """Recompute every legacy weight-norm attribute from its parameters, as its hook does before every
    forward; returns the names whose stored value differed from the recomputed one (or that could not
    be recomputed: parameters still on meta)."""
    stale = []
    for name, module, hook in _weight_norm_attributes(model):
        if any(p.is_meta for p in module.parameters(recurse=False)):
            stale.append(name)
            continue
        value = hook.compute_weight(module)
        if not identical(getattr(module, hook.name), value):
            stale.append(name)
        setattr(module, hook.name, value)
    return stale


# --------------------------------------------------------------------------- the comparison

def storage_sharing(tensors):
    """Which names hold tensors on one storage (views and aliases): {name: first name on that storage}.
    Tensors on meta, empty or not strided have no storage of their own to compare and are left out."""
    first = {}
    return {name: first.setdefault(tensor.untyped_storage().data_ptr(), name) for name, tensor in tensors.items()
            if not tensor.is_meta and tensor.numel() and tensor.layout == torch.strided}


def _names_differing(ours, theirs):
    names = sorted(set(ours) ^ set(theirs))
    return names + sorted(n for n in set(ours) & set(theirs) if not identical(ours[n], theirs[n]))


def differences(model, reference):
    """Everything of ``model`` that differs from the normal build ``reference``, by kind: ``{kind:
    [names]}`` for each of :data:`TENSOR_KINDS` and :data:`REPORTED` (a ``sharing`` or ``storage`` name
    is ``"buffer a.b"``, ``"attribute a.c"`` or ``"container a.d[0]"``)."""
    stale = refresh_weight_norm(model)
    refresh_weight_norm(reference)
    ours, theirs = unsaved(model), unsaved(reference)
    shared, shared_there = sharing(_everything(model)), sharing(_everything(reference))
    found = {kind: _names_differing(ours[kind], theirs[kind]) for kind in ours}
    found["sharing"] = sorted(n for n in set(shared) | set(shared_there) if shared.get(n) != shared_there.get(n))
    stored, stored_there = (storage_sharing({"%s %s" % (kind, name): tensor for kind, named in tensors.items()
                                             for name, tensor in named.items()}) for tensors in (ours, theirs))
    found["storage"] = sorted(n for n in set(stored) | set(stored_there) if stored.get(n) != stored_there.get(n))
    found["state"] = _names_differing(model.state_dict(), reference.state_dict())
    found["stale"] = stale
    return found


def _bare(kind, name):
    """The tensor's name in a finding: a sharing finding is ``"buffer a.b"``, the others ``"a.b"``."""
    return name.partition(" ")[2] if kind == "sharing" else name


# --------------------------------------------------------------------------- what the warnings name

def _places(model):
    """``{name: (path of the module holding it, that module's class, tensor)}`` for every unsaved tensor."""
    modules = dict(model.named_modules(remove_duplicate=False))
    where = {}
    found = {**non_persistent_buffers(model), **tensor_attributes(model), **container_tensors(model, where)}
    places = {}
    for name, tensor in found.items():
        path = where.get(name, name.rpartition(".")[0])  # a buffer's or attribute's own name has no dot
        module = modules.get(path)
        places[name] = (path, type(module).__qualname__ if module is not None else None, tensor)
    return places


def named_by(recoveries, model, reference):
    """``(named, relative, unmatched)``: the names (as :func:`differences` gives them) of the tensors
    the warnings' :class:`bufferfix.Recovery` values name; those among them named only relative to a
    submodule; and the recoveries that name no tensor of the model or of the reference."""
    if not recoveries:
        return [], [], []
    in_model = _places(model)
    places = {**_places(reference), **in_model}
    by_object = {}  # the model's names of one tensor object
    for name, (_, _, tensor) in in_model.items():
        by_object.setdefault(id(tensor), []).append(name)
    named, relative, unmatched = set(), set(), []
    for recovery in recoveries:
        head, _, last = recovery.name.rpartition(".")
        if recovery.name in places:
            found = [recovery.name]
        elif last.startswith("<"):  # a placeholder: everything on that module
            found = [name for name, (path, _, _) in places.items() if path == head]
        else:
            found = [name for name, (_, owner, _) in places.items()
                     if owner == recovery.owner and name.endswith("." + recovery.name)]
            relative.update(found)
        if not found:
            unmatched.append(recovery.name)
        for name in found:
            named.add(name)
            if name in in_model:
                named.update(by_object[id(in_model[name][2])])
    return sorted(named), sorted(relative), unmatched


# --------------------------------------------------------------------------- results

@dataclasses.dataclass
class FlowResult:
    error: str = None  # the flow itself (build, materialise, load) raised
    differences: dict = dataclasses.field(default_factory=dict)  # kind -> [names that differ]
    warnings: list = dataclasses.field(default_factory=list)  # bufferfix warnings, as text
    named: list = dataclasses.field(default_factory=list)  # the tensors they name (see named_by)
    relative: list = dataclasses.field(default_factory=list)  # of those, named only relative to a submodule
    unmatched: list = dataclasses.field(default_factory=list)  # names in them that no tensor has


@dataclasses.dataclass
class Result:
    name: str
    group: str = None
    class_name: str = None
    level: str = None  # how far its config was shrunk
    skipped: str = None  # why this case was not built
    harness_error: str = None  # the sweep itself failed on this case: a bug to fix here
    parameters: int = 0
    buffers: list = dataclasses.field(default_factory=list)  # non-persistent buffers of the reference
    attributes: list = dataclasses.field(default_factory=list)  # plain tensor attributes of the reference
    containers: list = dataclasses.field(default_factory=list)  # tensors in container attributes
    inputs: str = None  # what the outputs were compared on, or why they were not
    flows: list = dataclasses.field(default_factory=list)  # the flows judged, in order
    from_files: list = dataclasses.field(default_factory=list)  # those loading a saved directory
    fixes: dict = dataclasses.field(default_factory=dict)  # a library's own fix -> the flow it fixes
    with_bufferfix: dict = dataclasses.field(default_factory=dict)  # flow -> FlowResult
    without_bufferfix: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    @property
    def has_unsaved(self):
        return bool(self.buffers or self.attributes or self.containers)

    @property
    def built(self):
        return not self.skipped and not self.harness_error

    def problems(self, flow, enabled=True):
        """What is wrong in one flow, ``{kind: [names]}`` (``"raised"``: the error; ``"output"``), ``{}``
        when it gives the reference or cannot run at all.

        A flow that raises both with and without bufferfix does not apply to this model.  A state
        difference that shows up both ways is the flow's own doing (outputs cannot be judged then),
        not a buffer problem.  In a flow loading saved files, outputs that differ the same way both
        ways while every tensor is exact both ways are the files' doing (4.x ``from_pretrained``'s
        unaligned mmap'd weights pick other conv kernels).
        """
        ours, other = ((self.with_bufferfix, self.without_bufferfix) if enabled
                       else (self.without_bufferfix, self.with_bufferfix))
        ours, other = ours.get(flow), other.get(flow)
        if ours is None:
            return {}
        if ours.error:
            return {} if other is not None and other.error else {"raised": [ours.error]}
        kinds = {kind: names for kind, names in ours.differences.items()
                 if names and kind in TENSOR_KINDS + ("output",)}
        if other is None or other.error:
            pass
        elif "state" in kinds and other.differences.get("state") == kinds["state"]:
            kinds.pop("state")
            kinds.pop("output", None)
        elif ("output" in kinds and flow in self.from_files and other.differences.get("output") == kinds["output"]
              and not any(ours.differences.get(k) or other.differences.get(k) for k in TENSOR_KINDS)):
            kinds.pop("output")
        return kinds

    def verdicts(self, flow):
        """The judgement: ``{(kind, name): "named" | "silent"}`` for each thing ``flow`` gets wrong
        with bufferfix; every tensor not listed is exact.

        A tensor is named when a warning of that flow names it (:func:`named_by`).  Wrong outputs
        are named when every tensor the flow gets wrong is named (they are its consequence), silent
        when no tensor explains them.  A flow that raises only with bufferfix is named when
        bufferfix warned in it."""
        problems = self.problems(flow)
        ran = self.with_bufferfix.get(flow)
        named = set(ran.named) if ran else set()
        found = {(kind, name): "named" if _bare(kind, name) in named else "silent"
                 for kind, names in problems.items() if kind in TENSOR_KINDS for name in names}
        if "output" in problems:
            explained = bool(found) and all(verdict == "named" for verdict in found.values())
            found.update({("output", name): "named" if explained else "silent" for name in problems["output"]})
        if "raised" in problems:
            found[("raised", problems["raised"][0])] = "named" if ran.warnings else "silent"
        return found

    def broken(self, enabled=True, flows=None):
        """``{flow: {kind: [names]}}`` of every flow that does not give the reference."""
        return {flow: self.problems(flow, enabled) for flow in (flows or self.flows) if self.problems(flow, enabled)}

    def silent(self):
        """``{flow: [(kind, name)]}``: what bufferfix gets wrong and no warning names."""
        found = {flow: [key for key, verdict in self.verdicts(flow).items() if verdict == "silent"]
                 for flow in self.flows}
        return {flow: keys for flow, keys in found.items() if keys}

    def false_alarms(self, flow):
        """Warnings about what ``flow`` gets right: the tensors they name that are exact (``"exact, yet
        named: ..."``), or, when the whole flow is exact, every warning."""
        ran = self.with_bufferfix.get(flow)
        if ran is None or not ran.warnings:
            return []
        if not self.problems(flow):
            return list(ran.warnings)
        wrong = {_bare(kind, name) for kind, name in self.verdicts(flow)}
        return ["exact, yet named: " + name for name in ran.named if name not in wrong]

    def warned(self, flow):
        result = self.with_bufferfix.get(flow)
        return bool(result and result.warnings)

    def fix_works(self, fix):
        """Does the library's own fix ``fix`` (a flow), without bufferfix, give the reference?"""
        result = self.without_bufferfix.get(fix)
        return result is not None and not result.error and not self.problems(fix, enabled=False)

    def describe(self, enabled=True):
        header = ", ".join(part for part in (self.group, self.class_name, self.level and "config " + self.level,
                                              self.parameters and "%.1fM parameters" % (self.parameters / 1e6)) if part)
        lines = ["%s (%s):" % (self.name, header)]
        results = self.with_bufferfix if enabled else self.without_bufferfix
        for flow, problems in self.broken(enabled).items():
            verdicts = self.verdicts(flow) if enabled else {}
            parts = []
            for kind, names in problems.items():
                shown = ["%s%s" % (name, " [%s]" % verdicts[kind, name] if (kind, name) in verdicts else "")
                         for name in names[:SHOWN]]
                parts.append("%s: %s%s" % (kind, ", ".join(shown), " (+%d)" % (len(names) - SHOWN)
                                           if len(names) > SHOWN else ""))
            lines.append("  %s: %s" % (flow, "; ".join(parts)))
            lines += ["    warning: " + w[:600] for w in results[flow].warnings]
        return "\n".join(lines)

    def to_json(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d):
        d = dict(d)
        for key in ("with_bufferfix", "without_bufferfix"):
            d[key] = {flow: FlowResult(**r) for flow, r in d[key].items()}
        return cls(**d)


# --------------------------------------------------------------------------- guards

class OverTime(Exception):
    """A case ran past its time limit (:func:`time_limit`); a case's own code must let it through."""


@contextlib.contextmanager
def time_limit(seconds):
    """SIGALRM-based: a hung or huge build becomes an exception (main thread, POSIX only)."""
    if not hasattr(signal, "SIGALRM") or seconds is None:  # None: no limit
        yield
        return

    def expired(signum, frame):
        raise OverTime("over the %d s time limit" % seconds)

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def memory_limit(extra_bytes):
    """Allocations beyond ``extra_bytes`` more address space fail (some default configs would allocate
    16 GB buffers) instead of taking the machine down.  Linux only; elsewhere, or with None, no limit."""
    try:
        import resource

        if extra_bytes is None:
            raise ValueError("no limit")
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        previous = resource.getrlimit(resource.RLIMIT_AS)
        limit = size + extra_bytes
        if previous[1] != resource.RLIM_INFINITY:
            limit = min(limit, previous[1])
        resource.setrlimit(resource.RLIMIT_AS, (limit, previous[1]))
    except (ImportError, OSError, StopIteration, ValueError):
        yield
        return
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, previous)


@contextlib.contextmanager
def no_network():
    """Nothing may be downloaded (some default configs name hub checkpoints): the hub libraries are put
    in offline mode, even when they were imported before HF_HUB_OFFLINE was set (they read it once),
    and any connection attempt fails."""
    import socket

    def refuse(self, *args, **kwargs):
        raise OSError("the sweep is offline: no connection to %s" % (args[:1],))

    flags = []  # in the hub libraries already imported (one imported later reads HF_HUB_OFFLINE)
    for module_name, name in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("transformers.utils.hub",
                                                                              "_is_offline_mode")):
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, name):
            flags.append((module, name, getattr(module, name)))
    connect, socket.socket.connect = socket.socket.connect, refuse
    for module, name, _ in flags:
        setattr(module, name, True)
    try:
        yield
    finally:
        socket.socket.connect = connect
        for module, name, value in flags:
            setattr(module, name, value)


def bufferfix_enabled(enabled):
    return contextlib.nullcontext() if enabled else bufferfix.disabled()


def error_text(exc, limit=400):
    text = " / ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return "%s: %s" % (type(exc).__name__, text[:limit])


# --------------------------------------------------------------------------- running the flows

def _tensors(output):
    """Every tensor in a model output, in order (caches and other objects are left out)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):  # transformers' ModelOutput too
        return [t for value in output.values() for t in _tensors(value)]
    if isinstance(output, (list, tuple)):
        return [t for value in output for t in _tensors(value)]
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return [t for field in dataclasses.fields(output) for t in _tensors(getattr(output, field.name))]
    if hasattr(output, "to_tuple"):  # diffusers' BaseOutput
        return _tensors(output.to_tuple())
    return []


def run_forward(case, model, inputs):
    torch.manual_seed(0)
    with torch.no_grad():
        output = case.forward(model, inputs) if case.forward else model(**inputs)
    return [t.detach().clone() for t in _tensors(output)]


def _same(a, b):
    return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))


def run_flow(case, name, flow, build, reference, inputs=None, expected=None, lazy=False):
    """One flow's :class:`FlowResult`.  ``lazy``: no forward pass once unsaved tensors are known wrong."""
    result = FlowResult()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = flow.load(build, reference)
        except OverTime:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded, judged by Result.problems
            result.error = error_text(exc)
            model = None
    ours = [w.message for w in caught if issubclass(w.category, bufferfix.BufferFixWarning)]
    result.warnings = sorted({str(message) for message in ours})
    if model is None:
        return result
    model.eval()  # as the reference is (some modules cache tensors in train(False))
    recoveries = [recovery for message in ours for recovery in getattr(message, "recoveries", ())]
    result.named, result.relative, result.unmatched = named_by(recoveries, model, reference)
    result.differences = differences(model, reference)
    if lazy and any(result.differences[kind] for kind in ("buffer", "attribute", "container")):
        return result
    if inputs is not None:
        try:
            same = _same(run_forward(case, model, inputs), expected)
            result.differences["output"] = [] if same else ["outputs differ from the reference"]
        except OverTime:
            raise
        except Exception as exc:  # noqa: BLE001
            result.differences["output"] = ["forward raised " + error_text(exc)]
    return result


def _describe_inputs(inputs):
    return ", ".join("%s %s" % (k, tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__)
                     for k, v in inputs.items())


def _reference_outputs(case, second, result):
    """(inputs, outputs) of a second normal build for the first candidate input its forward takes, or
    (None, None) with the reason in ``result.inputs``.  The forward runs on a second build: a forward
    may cache tensors on modules, and the reference must stay as built."""
    if case.inputs is None:
        result.inputs = "not compared: no generic input"
        return None, None
    try:
        candidates = case.inputs(second)
    except OverTime:
        raise
    except NoInput as exc:
        result.inputs = "not compared: %s" % exc
        return None, None
    except Exception as exc:  # noqa: BLE001
        result.inputs = "not compared: making the input raised " + error_text(exc)
        return None, None
    candidates = [candidates] if isinstance(candidates, dict) else list(candidates)
    result.inputs = "not compared: no generic input"
    for inputs in candidates:
        try:
            expected = run_forward(case, second, inputs)
        except OverTime:
            raise
        except Exception as exc:  # noqa: BLE001
            result.inputs = "not compared: the reference's forward raised " + error_text(exc)
            continue
        if not expected:
            result.inputs = "not compared: the forward returned no tensor"
            continue
        if not _same(expected, run_forward(case, second, inputs)):
            result.inputs = "not compared: the reference's outputs are not deterministic"
            return None, None
        result.inputs = "compared on " + _describe_inputs(inputs)
        return inputs, expected
    return None, None


def check(case, with_bufferfix=True, without_bufferfix=True):
    """Build ``case`` normally and run every flow with and without bufferfix: a :class:`Result`.
    ``with_bufferfix`` / ``without_bufferfix``: which halves to run (a run of one half merges with an
    earlier run of the other: :func:`merged`)."""
    flows = case.all_flows()
    result = Result(case.name, group=case.group, flows=list(flows),
                    from_files=[name for name, flow in flows.items() if flow.from_files],
                    fixes={name: flow.fixes for name, flow in flows.items() if flow.fixes})
    start, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead, more so on a busy machine
    try:
        with time_limit(case.time_limit_s), memory_limit(case.memory_limit), no_network(), \
                uninitialised_memory_is_poisoned():
            _check(case, flows, result, with_bufferfix, without_bufferfix)
    except OverTime as exc:
        result.skipped = result.skipped or "over the time limit (%s)" % exc
    except Exception as exc:  # noqa: BLE001
        result.harness_error = "%s\n%s" % (error_text(exc), traceback.format_exc())
    finally:
        torch.set_num_threads(threads)
        result.seconds = round(time.perf_counter() - start, 2)
        gc.collect()
    return result


def _check(case, flows, result, with_bufferfix, without_bufferfix):
    def build():
        torch.manual_seed(0)
        return case.build()

    try:
        with bufferfix_enabled(False):  # the reference owes nothing to bufferfix
            reference = build().eval()
    except OverTime:
        raise
    except Skip as exc:
        result.skipped = str(exc)
        return
    except Exception as exc:  # noqa: BLE001
        result.skipped = "cannot build: " + error_text(exc)
        return
    result.level = case.level() if case.level else None
    result.class_name = type(reference).__name__
    result.parameters = sum(p.numel() for p in reference.parameters())
    tensors = unsaved(reference)
    result.buffers, result.attributes, result.containers = (sorted(tensors[kind]) for kind in
                                                            ("buffer", "attribute", "container"))
    inputs = expected = None
    if case.quick_flows is not None and not result.has_unsaved:
        flows = {name: flow for name, flow in flows.items() if name in case.quick_flows}
        result.flows = list(flows)
        result.inputs = "not compared: nothing unsaved (quick check)"
    else:
        with bufferfix_enabled(False):
            second = build().eval()
        unreproducible = {kind: names for kind, names in differences(second, reference).items()
                          if names and kind in TENSOR_KINDS}
        if unreproducible:
            result.skipped = "two seeded normal builds differ, nothing to compare against: %s" % unreproducible
            return
        inputs, expected = _reference_outputs(case, second, result)
        del second
    for name, flow in flows.items():
        compared = (inputs, expected) if case.outputs_in is None or name in case.outputs_in else (None, None)
        if with_bufferfix:
            result.with_bufferfix[name] = run_flow(case, name, flow, build, reference, *compared)
        if without_bufferfix:
            with bufferfix_enabled(False):
                result.without_bufferfix[name] = run_flow(case, name, flow, build, reference, *compared,
                                                          lazy=flow.fixes is None)


# --------------------------------------------------------------------------- report

def _count(results, predicate, *args):
    return sum(1 for r in results if predicate(r, *args))


def _raises_both_ways(result, flow):
    return all(getattr(half.get(flow), "error", None) for half in (result.with_bufferfix, result.without_bufferfix))


def summary(library, results):
    """The numbers, per flow (and per group), what is broken and how it is reported, as text."""
    built = [r for r in results if r.built]
    flows = list(dict.fromkeys(flow for r in built for flow in r.flows))
    broken_without = [r for r in built if r.broken(enabled=False)]
    broken_with = [r for r in built if r.broken(enabled=True)]
    silent = [r for r in broken_with if r.silent()]
    false_alarms = [r for r in built if any(r.false_alarms(flow) for flow in r.flows)]
    reported = {kind: [(r, flow) for r in built for flow, f in r.with_bufferfix.items() if f.differences.get(kind)]
                for kind in REPORTED}
    relative = [(r, flow) for r in built for flow, f in r.with_bufferfix.items() if f.relative]
    groups = sorted({r.group for r in results if r.group})
    lines = [
        library.version(),
        "cases: %d%s" % (len(results), " in %d groups" % len(groups) if groups else ""),
        "built:                                        %d" % len(built),
        "with non-persistent buffers / tensor attrs:   %d" % _count(built, lambda r: r.has_unsaved),
        "  (non-persistent buffers %d, plain tensor attributes %d, tensors in containers %d)" % (
            _count(built, lambda r: r.buffers), _count(built, lambda r: r.attributes),
            _count(built, lambda r: r.containers)),
        "broken without bufferfix (some flow):         %d" % len(broken_without),
        "broken with bufferfix (some flow):            %d  (silently, in some flow: %d)" % (len(broken_with),
                                                                                           len(silent)),
        "false alarms (a warning about something exact): %d" % len(false_alarms),
        "outputs compared: %d cases, %d (case, flow) pairs with bufferfix" % (
            _count(built, lambda r: r.inputs and r.inputs.startswith("compared")),
            sum(1 for r in built for f in r.with_bufferfix.values() if "output" in f.differences)),
    ]
    lines += ["not judged: %s, with bufferfix: %d cases, %d (case, flow) pairs" % (
        what, len({r.name for r, _ in reported[kind]}), len(reported[kind])) for kind, what in REPORTED.items()]
    quick = [r for r in built if r.inputs == "not compared: nothing unsaved (quick check)"]
    if quick:
        lines.append("nothing unsaved, so checked in %s only: %d" % (" and ".join(quick[0].flows), len(quick)))
    fixes = dict(pair for r in built for pair in r.fixes.items())
    for fix, fixed in fixes.items():
        ran = [r for r in built if fix in r.without_bufferfix and r.problems(fixed, enabled=False)]
        lines.append("%s, without bufferfix: exact in %d of the %d broken in %r"
                     % (fix, _count(ran, Result.fix_works, fix), len(ran), fixed))
    lines += [
        "",
        "broken without bufferfix, per flow: " + ", ".join(
            "%s %d" % (flow, _count(built, Result.problems, flow, False)) for flow in flows),
        "broken with bufferfix, per flow:    " + ", ".join(
            "%s %d" % (flow, _count(built, Result.problems, flow, True)) for flow in flows),
        "flow raises with and without bufferfix (does not apply, not counted): " + ", ".join(
            "%s %d" % (flow, _count(built, _raises_both_ways, flow)) for flow in flows),
    ]
    if groups:
        lines += ["", "per group: cases / built / with something unsaved / broken without / broken with"]
        for group in groups:
            mine = [r for r in results if r.group == group]
            ok = [r for r in mine if r.built]
            lines.append("  %-28s %3d / %3d / %3d / %3d / %3d" % (
                group, len(mine), len(ok), _count(ok, lambda r: r.has_unsaved),
                _count(ok, Result.broken, False), _count(ok, Result.broken, True)))
    if library.extra:
        lines += [""] + library.extra(results)
    lines += ["", "BROKEN WITH BUFFERFIX ([named] / [silent]):" if broken_with else "broken with bufferfix: none"]
    lines += [r.describe(enabled=True) for r in broken_with]
    if false_alarms:
        lines += ["", "FALSE ALARMS:"]
        lines += ["  %s / %s: %s" % (r.name, flow, alarm[:300]) for r in false_alarms for flow in r.flows
                  for alarm in r.false_alarms(flow)]
    if relative:
        lines += ["", "named only relative to a submodule (not a path in the model):"]
        lines += ["  %s / %s: %s" % (r.name, flow, ", ".join(r.with_bufferfix[flow].relative[:SHOWN]))
                  for r, flow in relative]
    for kind, what in REPORTED.items():
        if reported[kind]:
            lines += ["", "not judged: %s, with bufferfix:" % what]
            lines += ["  %s / %s: %s" % (r.name, flow, ", ".join(r.with_bufferfix[flow].differences[kind][:4]))
                      for r, flow in reported[kind][:20]]
    warned = ["  %s / %s: %s" % (r.name, flow, w[:300]) for r in built for flow, f in r.with_bufferfix.items()
              for w in f.warnings]
    lines += ["", "bufferfix warnings (with bufferfix): %s" % (len(warned) or "none")] + warned[:50]
    errors = ["  %s: %s" % (r.name, r.harness_error.splitlines()[0]) for r in results if r.harness_error]
    lines += ["", "HARNESS ERRORS (bugs of the sweep):" if errors else "harness errors: none"] + errors
    skipped = [r for r in results if r.skipped]
    categories = {}
    if library.skip_category and skipped:
        for r in skipped:
            categories.setdefault(library.skip_category(r.skipped), []).append(r.name)
        lines += ["", "skipped, by reason:"] + ["  %4d  %s" % (len(names), category) for category, names in
                                                 sorted(categories.items(), key=lambda item: -len(item[1]))]
    many = {category for category, names in categories.items() if len(names) > 100} if library.skip_category else set()
    lines += ["", "skipped: %d%s" % (len(skipped), " (listed but for: %s)" % "; ".join(sorted(many)) if many else "")]
    lines += ["  %s: %s" % (r.name, r.skipped[:200]) for r in skipped
              if not many or library.skip_category(r.skipped) not in many]
    return "\n".join(lines)


def write_json(path, library, results):
    with open(path, "w") as f:
        json.dump({"library": library.name, "version": library.version(),
                   "results": [r.to_json() for r in results]}, f)


def merged(paths):
    """Results of several :func:`write_json` files, by name: a later run wins, half by half (a run with
    bufferfix only keeps an earlier run's results without bufferfix)."""
    results = {}
    for path in paths:
        with open(path) as f:
            for d in json.load(f)["results"]:
                new, old = Result.from_json(d), results.get(d["name"])
                if old is not None and new.built:
                    new.with_bufferfix = new.with_bufferfix or old.with_bufferfix
                    new.without_bufferfix = new.without_bufferfix or old.without_bufferfix
                results[d["name"]] = new
    return list(results.values())


def interleaved(cases):
    """Round-robin over groups (each in its order), so that a partial run covers every group."""
    by_group = {}
    for case in cases:
        by_group.setdefault(case.group, []).append(case)
    queues = list(by_group.values())
    return [queue[i] for i in range(max(map(len, queues), default=0)) for queue in queues if i < len(queue)]


def select(cases, names):
    """The cases named exactly; a name no case has selects every case whose name contains it."""
    chosen = []
    for name in names:
        exact = [case for case in cases if case.name == name]
        chosen += exact or [case for case in cases if name in case.name]
    return list({id(case): case for case in chosen}.values())


def main(library, argv=None):
    """``python -m sweeps.<library> [options] [name ...]``: run the sweep and print its summary."""
    parser = argparse.ArgumentParser(description="The %s sweep: every case through every meta flow, with and "
                                                 "without bufferfix, bit for bit against a normal build."
                                                 % library.name)
    parser.add_argument("--json", help="also write every result to this file (rewritten after each case)")
    parser.add_argument("--from-json", nargs="+", help="only print the summary of earlier --json runs (merged)")
    parser.add_argument("--group", action="append", help="only the cases of this group (timm: a timm.models module)")
    parser.add_argument("--shard", help="K/N: only every N-th case, starting at the K-th (0-based)")
    parser.add_argument("--only", choices=("with", "without"), help="run only the flows with / without bufferfix")
    parser.add_argument("--outputs-in", help="compare outputs only in these flows (comma-separated; default all)")
    parser.add_argument("--list", action="store_true", help="print the case names and stop")
    parser.add_argument("names", nargs="*", help="only these cases (exact names, else substrings)")
    args = parser.parse_args(argv)
    if args.from_json:
        print(summary(library, merged(args.from_json)))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if library.quiet:
        library.quiet()
    cases = library.cases()
    if args.names:
        cases = select(cases, args.names)
    if args.group:
        cases = [case for case in cases if case.group in args.group]
    if any(case.group for case in cases):
        cases = interleaved(cases)
    if args.shard:
        k, n = map(int, args.shard.split("/"))
        cases = cases[k::n]
    if args.list:
        print("\n".join(case.name for case in cases))
        return 0
    results = []
    for case in cases:
        if args.outputs_in:
            case = dataclasses.replace(case, outputs_in=args.outputs_in.split(","))
        result = check(case, with_bufferfix=args.only != "without", without_bufferfix=args.only != "with")
        results.append(result)
        print("%-50s %6.1fs %s" % (case.name, result.seconds, state(result)[:200]), flush=True)
        if args.json:
            write_json(args.json, library, results)
    print()
    print(summary(library, results))
    sys.stdout.flush()
    return 0


def state(result):
    """One line: ok / broken (how) / skipped / harness error."""
    if result.harness_error:
        return "HARNESS ERROR: " + result.harness_error
    if result.skipped:
        return "skipped: " + result.skipped
    if result.broken():
        how = "silently" if result.silent() else "named"
        return "BROKEN with bufferfix (%s) in %s" % (how, ", ".join(result.broken()))
    if any(result.false_alarms(flow) for flow in result.flows):
        return "FALSE ALARM (exact, yet warned)"
    return "ok" + (" (broken without bufferfix)" if result.broken(False) else "")


# --------------------------------------------------------------------------- pytest

def subset(cases, names):
    """The cases named in ``names`` (a CI subset), failing loudly when one no longer exists."""
    by_name = {case.name: case for case in cases}
    missing = sorted(set(names) - set(by_name))
    assert not missing, "subset cases no longer in the sweep: %s" % missing
    return {name: by_name[name] for name in names}


def has_unsaved(result):
    return result.has_unsaved


def assert_exact_with_bufferfix(result, flows=None):
    """Every flow (or each of ``flows``) gives the reference with bufferfix, and nothing is warned about."""
    assert result.harness_error is None, result.harness_error
    assert result.skipped is None, result.skipped
    assert set(result.with_bufferfix) == set(result.flows)
    flows = flows or result.flows
    assert result.broken(flows=flows) == {}, result.describe()
    warned = {flow: result.with_bufferfix[flow].warnings for flow in flows if result.warned(flow)}
    assert warned == {}, "exact, yet warned (a false alarm): %s" % warned


def assert_broken_without_bufferfix(result, flows=None):
    """The case earns its place: something is lost without bufferfix (in some flow, or in each of ``flows``)."""
    assert result.has_unsaved, "nothing to lose: the case tests nothing"
    if flows is None:
        assert result.broken(enabled=False), "%s is not broken without bufferfix" % result.name
    for flow in flows or ():
        assert result.problems(flow, enabled=False), "%s is not broken without bufferfix in %s" % (result.name, flow)


def assert_exact_or_named(result):
    """The acceptance of the full library sweeps: each thing a flow gets wrong is named by a bufferfix
    warning (never silent), and no warning is about something exact."""
    assert result.harness_error is None, result.harness_error
    assert result.silent() == {}, result.describe()
    alarms = {flow: result.false_alarms(flow) for flow in result.flows if result.false_alarms(flow)}
    assert alarms == {}, "false alarms: %s" % alarms


def in_full_sweep(result, results, exact=False):
    """A full sweep's pytest test, for one case: keep its result for the summary; skip it where the case
    says why; else it must come out exact with bufferfix (``exact``) or exact-or-named."""
    import pytest

    results.append(result)
    assert result.harness_error is None, result.harness_error
    if result.skipped:
        pytest.skip(result.skipped)
    if exact:
        assert_exact_with_bufferfix(result)
    else:
        assert_exact_or_named(result)


def report_at_end(request, library, results):
    """For a full sweep's module fixture, after its tests: the summary in the terminal, and every result
    as JSON in ``$BUFFERFIX_SWEEP_JSON`` when set (``python -m sweeps.<library> --from-json`` reads it)."""
    if not results:
        return
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.line("")
            reporter.write_sep("=", "%s sweep" % library.name)
            reporter.write_line(summary(library, results))
    if os.environ.get("BUFFERFIX_SWEEP_JSON"):
        write_json(os.environ["BUFFERFIX_SWEEP_JSON"], library, results)

