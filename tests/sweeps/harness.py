"""What the model-library sweeps (issue 14: diffusers, torchtune, torchtitan, PEFT) share.

A library sweep is a list of :class:`Case`: a name, a zero-argument ``build`` (tiny dims, no
download), an optional generic input, and the library's own loading paths.  :func:`check` builds a
normal reference (``torch.manual_seed(0)``) and runs every flow of :data:`bufferfix.flows.FLOWS`,
``meta -> load_state_dict(assign=True)`` and the library's paths, once with bufferfix and once
without, comparing bit for bit: non-persistent buffers, plain tensor attributes, tensors held in
container attributes (lists / dicts of tensors on a module, tensors inside non-module objects such
as a scheduler a module holds), which of them share a tensor, the state dict, and the outputs.

The transformers architecture sweep (``tests/sweep.py``) is the model: its :class:`sweep.Result`
judgement (what counts as broken) is reused as is.
"""
import contextlib
import dataclasses
import gc
import time
import traceback
import warnings
from collections.abc import Callable

import torch

import bufferfix
from bufferfix.flows import FLOWS, uninitialised_memory_is_poisoned
from bufferfix.tools.compare import identical, non_persistent_buffers, qualified, sharing, tensor_attributes

from . import transformers as sweep

ASSIGN = "load_state_dict(assign=True)"


@contextlib.contextmanager
def bufferfix_enabled(enabled):
    if enabled:
        yield
    else:
        with bufferfix.disabled():
            yield
TIME_LIMIT_S = 240
MEMORY_LIMIT = 4 * 2**30


def assign_flow(build, state_dict, device="cpu"):
    """Built on meta, then ``load_state_dict(..., assign=True)``: never given to ``to_empty``."""
    with torch.device("meta"):
        model = build()
    model.load_state_dict({name: tensor.clone() for name, tensor in state_dict.items()}, assign=True)
    return model


GENERIC_FLOWS = dict(FLOWS, **{ASSIGN: assign_flow})


@dataclasses.dataclass
class Case:
    name: str
    build: Callable  # () -> nn.Module, unseeded: check() seeds it
    inputs: Callable | None = None  # (model) -> dict of keyword arguments for forward, or None
    loaders: dict = dataclasses.field(default_factory=dict)  # flow name -> (build, reference) -> model
    forward: Callable | None = None  # (model, inputs) -> output; default model(**inputs)
    flows: list | None = None  # default: every generic flow, then the loaders


@dataclasses.dataclass
class LibResult(sweep.Result):
    containers: list = dataclasses.field(default_factory=list)  # tensors in container attributes
    flows: list = dataclasses.field(default_factory=list)

    def broken(self, enabled=True):
        return {flow: self.problems(flow, enabled) for flow in self.flows if self.problems(flow, enabled)}

    def warned(self, flow):
        result = self.with_bufferfix.get(flow)
        return bool(result and result.warnings)


# --------------------------------------------------------------------------- tensors in containers

_MODULE_INTERNALS = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_backward_hooks",
                     "_backward_pre_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
                     "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
                     "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                     "_load_state_dict_post_hooks"}
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


def container_tensors(model):
    """``{name: tensor}`` of tensors a module reaches through a list, tuple, dict or plain object
    attribute (not parameters, buffers, submodules or direct tensor attributes), e.g.
    ``transformer.freqs[0]`` or ``decoder.scheduler.alphas_cumprod``."""
    found = {}
    for path, module in model.named_modules():
        seen = set()
        for name, value in vars(module).items():
            if name in _MODULE_INTERNALS or isinstance(value, (torch.Tensor, torch.nn.Module)):
                continue
            _walk(value, qualified(path, name), found, seen, _DEPTH)
    return found


# --------------------------------------------------------------------------- comparison


def _names_differing(ours, theirs):
    names = sorted(set(ours) ^ set(theirs))
    return names + sorted(n for n in set(ours) & set(theirs) if not identical(ours[n], theirs[n]))


def _everything(model):
    return {**{"buffer " + k: v for k, v in model.named_buffers(remove_duplicate=False)},
            **{"attribute " + k: v for k, v in tensor_attributes(model).items()},
            **{"container " + k: v for k, v in container_tensors(model).items()}}


def refresh_weight_norm(model):
    """Recompute every legacy ``torch.nn.utils.weight_norm`` ``weight`` attribute from its
    parameters, as the hook does before every forward.  Such an attribute is derived from
    parameters (a model loaded after ``to_empty`` holds the pre-load value until its first
    forward, with or without bufferfix): it is compared as the forward sees it."""
    from torch.nn.utils.weight_norm import WeightNorm

    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, WeightNorm) and not any(p.is_meta for p in module.parameters(recurse=False)):
                setattr(module, hook.name, hook.compute_weight(module))


def differences(model, reference):
    """Everything that differs from the reference, by kind (weight-norm attributes as recomputed)."""
    refresh_weight_norm(model)
    refresh_weight_norm(reference)
    ours, theirs = sharing(_everything(model)), sharing(_everything(reference))
    return {
        "buffer": _names_differing(non_persistent_buffers(model), non_persistent_buffers(reference)),
        "attribute": _names_differing(tensor_attributes(model), tensor_attributes(reference)),
        "container": _names_differing(container_tensors(model), container_tensors(reference)),
        "sharing": sorted(n for n in set(ours) | set(theirs) if ours.get(n) != theirs.get(n)),
        "state": _names_differing(model.state_dict(), reference.state_dict()),
    }


def _tensors(output):
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for value in output.values() for t in _tensors(value)]
    if isinstance(output, (list, tuple)):
        return [t for value in output for t in _tensors(value)]
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return [t for field in dataclasses.fields(output) for t in _tensors(getattr(output, field.name))]
    if hasattr(output, "to_tuple"):  # diffusers BaseOutput
        return _tensors(output.to_tuple())
    return []


def run_forward(case, model, inputs):
    torch.manual_seed(0)
    with torch.no_grad():
        output = case.forward(model, inputs) if case.forward else model(**inputs)
    return [t.detach().clone() for t in _tensors(output)]


def _same(a, b):
    return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------- running


def _error(exc):
    text = " / ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return "%s: %s" % (type(exc).__name__, text[:300])


def run_flow(case, flow, build, reference, inputs=None, expected=None, lazy=False):
    result = sweep.FlowResult()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if flow in case.loaders:
                model = case.loaders[flow](build, reference)
            else:
                model = GENERIC_FLOWS[flow](build, reference.state_dict())
        except sweep._TimeLimit:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded, judged by the caller
            result.error = _error(exc)
            model = None
    result.warnings = sorted({str(w.message) for w in caught if issubclass(w.category, bufferfix.BufferFixWarning)})
    if model is None:
        return result
    model.eval()
    result.differences = differences(model, reference)
    if lazy and any(result.differences[kind] for kind in ("buffer", "attribute", "container")):
        return result
    if inputs is not None:
        try:
            same = _same(run_forward(case, model, inputs), expected)
            result.differences["output"] = [] if same else ["outputs differ from the reference"]
        except sweep._TimeLimit:
            raise
        except Exception as exc:  # noqa: BLE001
            result.differences["output"] = ["forward raised " + _error(exc)]
    return result


def _reference_outputs(case, build, reference, result):
    second = build().eval()
    unreproducible = {kind: names for kind, names in differences(second, reference).items() if names}
    if unreproducible:
        result.skipped = "two seeded normal builds differ, nothing to compare against: %s" % unreproducible
        return None, None
    if case.inputs is None:
        result.inputs = "not compared: no generic input"
        return None, None
    try:
        inputs = case.inputs(second)
        expected = run_forward(case, second, inputs)
    except sweep._TimeLimit:
        raise
    except Exception as exc:  # noqa: BLE001
        result.inputs = "not compared: the reference's forward raised " + _error(exc)
        return None, None
    if not expected:
        result.inputs = "not compared: the forward returned no tensor"
        return None, None
    if not _same(expected, run_forward(case, second, inputs)):
        result.inputs = "not compared: the reference's outputs are not deterministic"
        return None, None
    result.inputs = "compared on " + ", ".join(
        "%s %s" % (k, tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__) for k, v in inputs.items())
    return inputs, expected


def check(case, time_limit_s=TIME_LIMIT_S, with_bufferfix=True, without_bufferfix=True):
    """Build ``case`` normally and run every flow with and without bufferfix: a :class:`LibResult`."""
    flows = case.flows or (list(GENERIC_FLOWS) + list(case.loaders))
    result = LibResult(case.name, flows=flows)
    start, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with sweep.time_limit(time_limit_s), sweep.memory_limit(MEMORY_LIMIT), uninitialised_memory_is_poisoned():
            _check(case, result, with_bufferfix, without_bufferfix)
    except sweep._TimeLimit as exc:
        result.skipped = result.skipped or "over the time limit (%s)" % exc
    except Exception as exc:  # noqa: BLE001
        result.harness_error = "%s\n%s" % (_error(exc), traceback.format_exc())
    finally:
        torch.set_num_threads(threads)
        result.seconds = round(time.perf_counter() - start, 2)
        gc.collect()
    return result


def _check(case, result, with_bufferfix, without_bufferfix):
    def build():
        torch.manual_seed(0)
        return case.build()

    try:
        reference = build().eval()
    except sweep._TimeLimit:
        raise
    except Exception as exc:  # noqa: BLE001
        result.skipped = "cannot build: " + _error(exc)
        return
    result.class_name = type(reference).__name__
    result.parameters = sum(p.numel() for p in reference.parameters())
    result.buffers = sorted(non_persistent_buffers(reference))
    result.attributes = sorted(tensor_attributes(reference))
    result.containers = sorted(container_tensors(reference))
    inputs, expected = _reference_outputs(case, build, reference, result)
    if result.skipped:
        return
    for flow in result.flows:
        if with_bufferfix:
            result.with_bufferfix[flow] = run_flow(case, flow, build, reference, inputs, expected)
        if without_bufferfix:
            with bufferfix_enabled(False):
                result.without_bufferfix[flow] = run_flow(case, flow, build, reference, inputs, expected, lazy=True)


# --------------------------------------------------------------------------- report


def has_unsaved(result):
    return bool(result.buffers or result.attributes or result.containers)


def summary(library, results):
    built = [r for r in results if not r.skipped and not r.harness_error]
    with_buffers = [r for r in built if has_unsaved(r)]
    broken_without = [r for r in built if r.broken(enabled=False)]
    broken_with = [r for r in built if r.broken(enabled=True)]
    silent = [r for r in broken_with if any(not r.warned(flow) for flow in r.broken(enabled=True))]
    flows = list(dict.fromkeys(flow for r in built for flow in r.flows))
    false_alarms = [r for r in built if any(r.warned(f) and not r.problems(f) for f in r.flows)]
    lines = [
        library,
        "cases: %d" % len(results),
        "built:                                        %d" % len(built),
        "with non-persistent buffers / tensor attrs:   %d" % len(with_buffers),
        "  (non-persistent buffers %d, plain tensor attributes %d, tensors in containers %d)" % (
            sum(1 for r in built if r.buffers), sum(1 for r in built if r.attributes),
            sum(1 for r in built if r.containers)),
        "broken without bufferfix (some flow):         %d" % len(broken_without),
        "broken with bufferfix (some flow):            %d  (silently, no warning: %d)" % (len(broken_with),
                                                                                          len(silent)),
        "exact with bufferfix but warned (false alarm): %d" % len(false_alarms),
        "outputs compared: %d" % sum(1 for r in built if r.inputs and r.inputs.startswith("compared")),
        "",
        "broken without bufferfix, per flow: " + ", ".join(
            "%s %d" % (flow, sum(1 for r in built if r.problems(flow, enabled=False))) for flow in flows),
        "broken with bufferfix, per flow:    " + ", ".join(
            "%s %d" % (flow, sum(1 for r in built if r.problems(flow, enabled=True))) for flow in flows),
        "",
        "BROKEN WITH BUFFERFIX:" if broken_with else "broken with bufferfix: none",
    ]
    lines += [r.describe(enabled=True) for r in broken_with]
    if false_alarms:
        lines += ["", "FALSE ALARMS (exact, yet warned):"]
        lines += ["  %s / %s: %s" % (r.model_type, f, w[:300]) for r in false_alarms for f in r.flows
                  if r.warned(f) and not r.problems(f) for w in r.with_bufferfix[f].warnings]
    errors = ["  %s: %s" % (r.model_type, r.harness_error.splitlines()[0]) for r in results if r.harness_error]
    lines += ["", "HARNESS ERRORS:" if errors else "harness errors: none"] + errors
    lines += ["", "skipped:"] + ["  %s: %s" % (r.model_type, r.skipped[:200]) for r in results if r.skipped]
    return "\n".join(lines)


def main(library, cases, argv=None):
    """``python tests/sweep_<library>.py [--json out.json] [name...]``: run and print the summary."""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("names", nargs="*")
    args = parser.parse_args(argv)
    results = []
    for case in cases:
        if args.names and not any(n in case.name for n in args.names):
            continue
        result = check(case)
        results.append(result)
        state = ("HARNESS ERROR: " + result.harness_error if result.harness_error
                 else "skipped: " + result.skipped if result.skipped
                 else "BROKEN with bufferfix " + str(list(result.broken())) if result.broken() else "ok")
        print("%-50s %6.1fs %s" % (case.name, result.seconds, state[:200]), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"library": library, "torch": torch.__version__,
                           "results": [r.to_json() for r in results]}, f)
    print()
    print(summary(library, results))
    sys.stdout.flush()
    return 0


# --------------------------------------------------------------------------- the CI subsets

def subset(cases, names):
    """The cases named in ``names`` (a CI subset), failing loudly when one no longer exists."""
    by_name = {case.name: case for case in cases}
    missing = sorted(set(names) - set(by_name))
    assert not missing, "subset cases no longer in the sweep: %s" % missing
    return {name: by_name[name] for name in names}


def assert_exact_with_bufferfix(result):
    assert result.harness_error is None, result.harness_error
    assert result.skipped is None, result.skipped
    assert result.with_bufferfix.keys() == set(result.flows)
    assert result.broken() == {}, result.describe()
    assert all(not result.warned(flow) for flow in result.flows), "exact, yet warned (a false alarm): %s" % {
        flow: result.with_bufferfix[flow].warnings for flow in result.flows if result.warned(flow)}


def assert_broken_without_bufferfix(result):
    assert has_unsaved(result), "nothing to lose: the case tests nothing"
    assert result.broken(enabled=False), "%s is not broken without bufferfix" % result.model_type


def assert_exact_or_named(result):
    """The acceptance of the full sweeps: every flow gives the reference, or each one that does not
    names what it lost in a bufferfix warning (never silently wrong)."""
    assert result.harness_error is None, result.harness_error
    silent = {flow: problems for flow, problems in result.broken().items() if not result.warned(flow)}
    assert silent == {}, result.describe()

