"""The timm sweep (issue 14): every timm architecture within a size limit, through every meta flow.

For each name in ``timm.list_models()`` (one per model entrypoint, no pretrained tag) whose default
build has at most :data:`MAX_PARAMETERS` parameters, this builds a normal reference on CPU
(``torch.manual_seed(0)``, ``timm.create_model(name)``, default arguments: nothing is shrunk) and
runs every flow of :data:`bufferfix.flows.FLOWS`, ``load_state_dict(assign=True)`` on a meta model,
and timm's own meta path (``timm.create_model(name, device="meta")`` -> ``to_empty`` -> load), once
with bufferfix and once without.  Each materialised model is compared bit for bit with the
reference: non-persistent buffers, plain tensor attributes, tensors held in list / tuple / dict
attributes of modules, which of them share storage, the state dict, and the outputs on a generic
image input (``resolve_data_config``'s input size, batch 1).

timm's own manual fix is run beside it, without bufferfix: the same ``device="meta"`` path followed
by ``timm.models.reinit_non_persistent_buffers(model)``, which calls ``init_non_persistent_buffers()``
on every module that defines it (``create_model`` does not call it).

Everything runs under :func:`bufferfix.flows.uninitialised_memory_is_poisoned`, so a lost buffer
reads as NaN / max-int and can never pass by luck.  Families are timm's model modules
(``timm.models.<family>``).  Used by ``tests/test_timm_sweep.py``, and runnable on its own::

    python tests/sweep_timm.py --report                     # every architecture (hours on 2 cores)
    python tests/sweep_timm.py --report swin_tiny_patch4_window7_224 resnet18
    python tests/sweep_timm.py --report --family swin_transformer --json out.json
    python tests/sweep_timm.py --from-json out.json         # the summary of an earlier run

Nothing is downloaded: every model is built with ``pretrained=False``.
"""
import argparse
import dataclasses
import gc
import json
import os
import sys
import time
import traceback
import warnings

import torch

import bufferfix
from bufferfix.flows import FLOWS, uninitialised_memory_is_poisoned
from bufferfix.tools.compare import identical, non_persistent_buffers, sharing, tensor_attributes

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: pretrained=False never downloads

import timm
import timm.data
from timm.models import _registry

from .harness import _names_differing, bufferfix_enabled
from .transformers import _TimeLimit, time_limit

try:  # timm's own manual fix (recent timm); create_model does not call it
    from timm.models._manipulate import reinit_non_persistent_buffers
except ImportError:  # pragma: no cover - older timm: that flow then raises and is reported as such
    def reinit_non_persistent_buffers(model):
        raise NotImplementedError("timm %s has no reinit_non_persistent_buffers" % timm.__version__)

MAX_PARAMETERS = 60_000_000  # default build; bigger ones are skipped, not shrunk
TIME_LIMIT_S = 600  # per architecture, everything included

ASSIGN = "load_state_dict(assign=True)"
TIMM_META = "timm create_model(device='meta')"
TIMM_REINIT = "timm device='meta' + reinit_non_persistent_buffers"  # timm's own manual fix
ALL_FLOWS = list(FLOWS) + [ASSIGN, TIMM_META]
TIMM_FLOWS = ALL_FLOWS + [TIMM_REINIT]
# A model whose normal build holds no non-persistent buffer, plain tensor attribute or tensor in a
# container attribute has nothing a checkpoint lacks: the full sweep checks it in these two flows
# only (with and without bufferfix; tensors and the state dict, no forward), to keep the sweep
# within hours on 2 cores.
QUICK_FLOWS = ["torch.device('meta')", TIMM_META]
_TENSOR_KINDS = ("buffer", "attribute", "container", "sharing", "state")  # and "output"


# --------------------------------------------------------------------------- which architectures

def architectures():
    """{name: family} for every model entrypoint timm registers (``timm.list_models()``)."""
    return {name: family_of(name) for name in timm.list_models()}


def interleaved(names, families):
    """Round-robin over families (each in name order), so that a partial run covers every family."""
    by_family = {}
    for name in sorted(names):
        by_family.setdefault(families[name], []).append(name)
    queues = [by_family[family] for family in sorted(by_family)]
    return [queue[i] for i in range(max(map(len, queues), default=0)) for queue in queues if i < len(queue)]


def family_of(name):
    return _registry._model_to_module.get(name) or timm.models.model_entrypoint(name).__module__.rpartition(".")[2]


# --------------------------------------------------------------------------- flows

def assign_flow(build, state_dict, device="cpu"):
    """Meta build -> ``load_state_dict(assign=True)`` (what torch.distributed.checkpoint does)."""
    with torch.device("meta"):
        model = build()
    model.load_state_dict({k: v.to(device, copy=True) for k, v in state_dict.items()}, assign=True)
    return model


def timm_meta_flow(name, model_kwargs=None):
    """timm's own meta build: ``create_model(name, device="meta")`` -> ``to_empty`` -> load."""
    def flow(build, state_dict, device="cpu"):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, device="meta", **(model_kwargs or {}))
        model.to_empty(device=device)
        model.load_state_dict(state_dict)
        return model
    return flow


def timm_reinit_flow(name, model_kwargs=None):
    """The same, then timm's manual fix: ``timm.models.reinit_non_persistent_buffers(model)``."""
    meta = timm_meta_flow(name, model_kwargs)

    def flow(build, state_dict, device="cpu"):
        model = meta(build, state_dict, device)
        reinit_non_persistent_buffers(model)
        return model
    return flow


def flows_for(name, model_kwargs=None):
    return {**FLOWS, ASSIGN: assign_flow, TIMM_META: timm_meta_flow(name, model_kwargs),
            TIMM_REINIT: timm_reinit_flow(name, model_kwargs)}


# --------------------------------------------------------------------------- comparison

def container_tensors(model):
    """``{qualified name: tensor}`` of tensors held in list / tuple / dict attributes of modules."""
    found = {}
    for path, module in model.named_modules():
        for name, value in vars(module).items():
            if name.startswith("_") or not isinstance(value, (list, tuple, dict)):
                continue  # _parameters, _buffers, _modules, hooks: torch's own containers
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(item, torch.Tensor) and not isinstance(item, torch.nn.Parameter):
                    found["%s%s[%r]" % (path + "." if path else "", name, key)] = item
    return found


def differences(model, reference):
    """Everything that differs from the reference, by kind."""
    def everything(m):
        return {**{"buffer " + k: v for k, v in m.named_buffers(remove_duplicate=False)},
                **{"attribute " + k: v for k, v in tensor_attributes(m).items()},
                **{"container " + k: v for k, v in container_tensors(m).items()}}

    ours, theirs = sharing(everything(model)), sharing(everything(reference))
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
    return []


def generic_input(model):
    """One seeded image batch of the model's default input size (``resolve_data_config``)."""
    size = timm.data.resolve_data_config({}, model=model)["input_size"]
    return torch.randn(1, *size, generator=torch.Generator().manual_seed(1))


def run_forward(model, inputs):
    torch.manual_seed(0)
    with torch.no_grad():
        return [t.detach().clone() for t in _tensors(model.eval()(inputs))]


def _same_outputs(a, b):
    return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------- results

@dataclasses.dataclass
class FlowResult:
    error: str = None  # the flow itself (build, materialise, load) raised
    differences: dict = dataclasses.field(default_factory=dict)  # kind -> [names that differ]
    warnings: list = dataclasses.field(default_factory=list)  # bufferfix warnings


@dataclasses.dataclass
class Result:
    name: str
    family: str = None
    skipped: str = None  # why this architecture was not built
    harness_error: str = None  # the sweep itself failed: a bug to fix here
    parameters: int = 0
    buffers: list = dataclasses.field(default_factory=list)  # non-persistent buffers of the reference
    attributes: list = dataclasses.field(default_factory=list)  # plain tensor attributes
    containers: list = dataclasses.field(default_factory=list)  # tensors in list / dict attributes
    inputs: str = None  # what the outputs were compared on, or why not
    with_bufferfix: dict = dataclasses.field(default_factory=dict)  # flow -> FlowResult
    without_bufferfix: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    @property
    def has_unsaved(self):
        return bool(self.buffers or self.attributes or self.containers)

    def problems(self, flow, enabled=True):
        """What is wrong in one flow, [] when it gives the reference (or cannot run at all).

        A flow that raises both with and without bufferfix does not apply to this model; a state
        difference that shows both ways is the flow's own doing (outputs cannot be judged then).
        """
        ours, other = ((self.with_bufferfix, self.without_bufferfix) if enabled
                       else (self.without_bufferfix, self.with_bufferfix))
        ours, other = ours.get(flow), other.get(flow)
        if ours is None:
            return []
        if ours.error:
            return [] if other is not None and other.error else ["raised: " + ours.error]
        kinds = {kind: names for kind, names in ours.differences.items() if names}
        if (other is not None and not other.error and "state" in kinds
                and other.differences.get("state") == kinds["state"]):
            kinds.pop("state")
            kinds.pop("output", None)
        return ["%s: %s" % (kind, ", ".join(names[:6]) + (" (+%d)" % (len(names) - 6) if len(names) > 6 else ""))
                for kind, names in kinds.items()]

    def broken(self, enabled=True, flows=ALL_FLOWS):
        return {flow: self.problems(flow, enabled) for flow in flows if self.problems(flow, enabled)}

    def warned(self, flow):
        """Did bufferfix warn in this flow (a loud failure, which the contract allows)?"""
        result = self.with_bufferfix.get(flow)
        return bool(result and result.warnings)

    def silently_broken(self):
        return {flow: p for flow, p in self.broken(True).items() if not self.warned(flow)}

    def timm_reinit_fixes(self):
        """Does timm's own reinit_non_persistent_buffers (without bufferfix) give the reference?"""
        result = self.without_bufferfix.get(TIMM_REINIT)
        return result is not None and not result.error and not self.problems(TIMM_REINIT, enabled=False)

    def describe(self, enabled=True):
        lines = ["%s (%s, %.1fM parameters):" % (self.name, self.family, self.parameters / 1e6)]
        results = self.with_bufferfix if enabled else self.without_bufferfix
        for flow, problems in self.broken(enabled).items():
            lines.append("  %s: %s" % (flow, "; ".join(problems)))
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


# --------------------------------------------------------------------------- running the flows

def _error(exc):
    text = " / ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return "%s: %s" % (type(exc).__name__, text[:400])


def run_flow(flow, function, build, reference, inputs=None, expected=None, lazy=False):
    """One flow's :class:`FlowResult`.  ``lazy``: no forward pass once tensors are known broken."""
    result = FlowResult()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = function(build, reference.state_dict())
        except _TimeLimit:
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
    if inputs is not None and expected is not None:
        try:
            same = _same_outputs(run_forward(model, inputs), expected)
            result.differences["output"] = [] if same else ["outputs differ from the reference"]
        except _TimeLimit:
            raise
        except Exception as exc:  # noqa: BLE001
            result.differences["output"] = ["forward raised " + _error(exc)]
    del model
    return result


def size_of(name, model_kwargs=None):
    """Parameters of the default build, counted on meta without bufferfix (nothing allocated)."""
    with bufferfix_enabled(False), warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = timm.create_model(name, pretrained=False, **(model_kwargs or {}))
    return sum(p.numel() for p in model.parameters())


def check(name, family=None, flows=None, time_limit_s=TIME_LIMIT_S, max_parameters=MAX_PARAMETERS,
          model_kwargs=None, quick=True, with_bufferfix=True, without_bufferfix=True, output_flows=None):
    """Build timm model ``name`` and run ``flows`` (default: all) with and without bufferfix.
    ``model_kwargs`` go to ``timm.create_model`` (the full sweep passes none: default builds).
    ``quick``: a model with nothing unsaved runs :data:`QUICK_FLOWS` only.  ``with_bufferfix`` /
    ``without_bufferfix``: which halves to run (a run of one half merges with an earlier run of
    the other: ``--from-json``).  ``output_flows``: the flows whose outputs are compared (default
    all; tensors and the state dict are compared in every flow)."""
    result = Result(name, family or family_of(name))
    start, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; tiny batches gain little from threads
    try:
        with time_limit(time_limit_s), uninitialised_memory_is_poisoned(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="timm")
            _check(result, flows or TIMM_FLOWS, max_parameters, model_kwargs or {}, quick, with_bufferfix,
                   without_bufferfix, output_flows)
    except _TimeLimit as exc:
        result.skipped = result.skipped or "over the time limit (%s)" % exc
    except Exception as exc:  # noqa: BLE001
        result.harness_error = "%s\n%s" % (_error(exc), traceback.format_exc())
    finally:
        torch.set_num_threads(threads)
        result.seconds = round(time.perf_counter() - start, 2)
        gc.collect()
    return result


def _check(result, flows, max_parameters, model_kwargs, quick, with_bufferfix, without_bufferfix, output_flows):
    name = result.name
    try:
        result.parameters = size_of(name, model_kwargs)
    except Exception as exc:  # noqa: BLE001
        result.skipped = "cannot build: " + _error(exc)
        return
    if result.parameters > max_parameters:
        result.skipped = "%.1fM parameters, over the %dM limit" % (result.parameters / 1e6, max_parameters // 10**6)
        return

    def build():
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, **model_kwargs)

    with bufferfix_enabled(False):  # the reference owes nothing to bufferfix
        reference = build().eval()
    result.buffers = sorted(non_persistent_buffers(reference))
    result.attributes = sorted(tensor_attributes(reference))
    result.containers = sorted(container_tensors(reference))
    inputs = expected = None
    if quick and not result.has_unsaved:
        # Nothing a checkpoint lacks: tensors and state dict compared in QUICK_FLOWS, no forward.
        flows = [flow for flow in flows if flow in QUICK_FLOWS]
        result.inputs = "not compared: nothing unsaved (quick check)"
    else:
        with bufferfix_enabled(False):
            second = build().eval()
        unreproducible = {kind: names for kind, names in differences(second, reference).items() if names}
        if unreproducible:
            result.skipped = "two seeded normal builds differ, nothing to compare against: %s" % unreproducible
            return
        inputs, expected = _reference_outputs(second, result)
        del second
    functions = flows_for(name, model_kwargs)
    for flow in flows:
        compared = (inputs, expected) if output_flows is None or flow in output_flows else (None, None)
        if with_bufferfix:
            result.with_bufferfix[flow] = run_flow(flow, functions[flow], build, reference, *compared)
        if without_bufferfix:
            with bufferfix_enabled(False):
                result.without_bufferfix[flow] = run_flow(flow, functions[flow], build, reference, *compared,
                                                          lazy=flow != TIMM_REINIT)


def _reference_outputs(model, result):
    """(inputs, outputs) of a second normal build (a forward may cache tensors on modules, and the
    reference must stay as built), or (None, None) with the reason in ``result.inputs``."""
    try:
        inputs = generic_input(model)
        expected = run_forward(model, inputs)
        if not _same_outputs(expected, run_forward(model, inputs)):
            result.inputs = "not compared: the reference's outputs are not deterministic"
            return None, None
    except _TimeLimit:
        raise
    except Exception as exc:  # noqa: BLE001
        result.inputs = "not compared: the reference's forward raised " + _error(exc)
        return None, None
    result.inputs = "compared on images %s" % (tuple(inputs.shape),)
    return inputs, expected


# --------------------------------------------------------------------------- report

def skip_category(reason):
    if "over the" in reason and "limit" in reason and "parameters" in reason:
        return "over the %dM parameter limit (default build)" % (MAX_PARAMETERS // 10**6)
    if "time limit" in reason:
        return "over the time limit"
    if reason.startswith("cannot build"):
        return "does not build with default arguments"
    if reason.startswith("two seeded"):
        return "two seeded normal builds differ"
    return "other: " + reason[:80]


def summary(results):
    """The numbers, per family, what is broken, and timm's own fix beside them, as text."""
    results = sorted(results, key=lambda r: (r.family or "", r.name))
    built = [r for r in results if not r.skipped and not r.harness_error]
    with_unsaved = [r for r in built if r.has_unsaved]
    broken_without = [r for r in built if r.broken(enabled=False)]
    broken_with = [r for r in built if r.broken(enabled=True)]
    silent = [r for r in broken_with if r.silently_broken()]
    reinit_ran = [r for r in built if TIMM_REINIT in r.without_bufferfix and r.broken(False, [TIMM_META])]
    reinit_fixed = [r for r in reinit_ran if r.timm_reinit_fixes()]
    families = sorted({r.family for r in results})
    lines = [
        "timm %s, torch %s" % (timm.__version__, torch.__version__),
        "architectures (timm.list_models()): %d in %d families" % (len(results), len(families)),
        "built (<= %dM parameters):                  %d in %d families"
        % (MAX_PARAMETERS // 10**6, len(built), len({r.family for r in built})),
        "with non-persistent buffers / tensor attrs:  %d" % len(with_unsaved),
        "  (non-persistent buffers %d, plain tensor attributes %d, tensors in containers %d)"
        % (len([r for r in built if r.buffers]), len([r for r in built if r.attributes]),
           len([r for r in built if r.containers])),
        "broken without bufferfix (some flow):        %d" % len(broken_without),
        "broken with bufferfix (some flow):           %d (of which silently: %d)" % (len(broken_with), len(silent)),
        "timm's reinit_non_persistent_buffers, alone: fixes %d of the %d broken in %r"
        % (len(reinit_fixed), len(reinit_ran), TIMM_META),
        "outputs compared: %d models, %d (model, flow) pairs with bufferfix" % (
            len([r for r in built if r.inputs and r.inputs.startswith("compared")]),
            sum(1 for r in built for f in r.with_bufferfix.values() if "output" in f.differences)),
        "nothing unsaved, so checked in %s only: %d" % (" and ".join(QUICK_FLOWS), len(
            [r for r in built if set(r.with_bufferfix) == set(QUICK_FLOWS)])),
        "",
        "broken without bufferfix, per flow: " + ", ".join(
            "%s %d" % (flow, sum(1 for r in built if r.problems(flow, enabled=False))) for flow in ALL_FLOWS),
        "broken with bufferfix, per flow:    " + ", ".join(
            "%s %d" % (flow, sum(1 for r in built if r.problems(flow, enabled=True))) for flow in ALL_FLOWS),
        "flow raises with and without bufferfix (does not apply, not counted): " + ", ".join(
            "%s %d" % (flow, sum(1 for r in built if all(getattr(half.get(flow), "error", None) for half in (
                r.with_bufferfix, r.without_bufferfix)))) for flow in ALL_FLOWS),
        "",
        "per family: architectures / built / with buffers / broken without / broken with / timm reinit fixes",
    ]
    for family in families:
        mine = [r for r in results if r.family == family]
        ok = [r for r in mine if r in built]
        lines.append("  %-28s %3d / %3d / %3d / %3d / %3d / %s" % (
            family, len(mine), len(ok), len([r for r in ok if r.has_unsaved]),
            len([r for r in ok if r.broken(False)]), len([r for r in ok if r.broken(True)]),
            "%d of %d" % (len([r for r in reinit_fixed if r.family == family]),
                          len([r for r in reinit_ran if r.family == family]))))
    lines += ["", "BROKEN WITH BUFFERFIX:" if broken_with else "broken with bufferfix: none"]
    lines += [r.describe(enabled=True) for r in broken_with]
    warned = ["  %s / %s: %s" % (r.name, flow, w[:300]) for r in built for flow, f in r.with_bufferfix.items()
              for w in f.warnings]
    lines += ["", "bufferfix warnings (with bufferfix): %s" % (len(warned) or "none")] + warned[:80]
    errors = ["  %s: %s" % (r.name, r.harness_error.splitlines()[0]) for r in results if r.harness_error]
    lines += ["", "HARNESS ERRORS (bugs of the sweep):" if errors else "harness errors: none"] + errors
    categories = {}
    for r in results:
        if r.skipped:
            categories.setdefault(skip_category(r.skipped), []).append(r.name)
    lines += ["", "skipped, by reason:"] + ["  %4d  %s" % (len(names), category) for category, names in
                                             sorted(categories.items(), key=lambda item: -len(item[1]))]
    other = ["  %s: %s" % (r.name, r.skipped[:200]) for r in results
             if r.skipped and not skip_category(r.skipped).startswith("over the %d" % (MAX_PARAMETERS // 10**6))]
    lines += ["", "skipped other than by size:"] + (other or ["  none"])
    return "\n".join(lines)


def merged(paths):
    """Results of several --json runs, by name: a later run wins, half by half (a run with bufferfix
    only keeps an earlier run's results without bufferfix)."""
    results = {}
    for path in paths:
        with open(path) as f:
            for d in json.load(f)["results"]:
                new, old = Result.from_json(d), results.get(d["name"])
                if old is not None and not new.skipped and not new.harness_error:
                    new.with_bufferfix = new.with_bufferfix or old.with_bufferfix
                    new.without_bufferfix = new.without_bufferfix or old.without_bufferfix
                results[d["name"]] = new
    return list(results.values())


def write_json(path, results):
    with open(path, "w") as f:
        json.dump({"timm": timm.__version__, "torch": torch.__version__,
                   "results": [r.to_json() for r in results]}, f)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", action="store_true", help="run the sweep and print the summary")
    parser.add_argument("--json", help="also write every result to this file (rewritten after each model)")
    parser.add_argument("--from-json", nargs="+", help="only print the summary of earlier --json runs")
    parser.add_argument("--family", action="append", help="only the architectures of this timm.models module")
    parser.add_argument("--shard", help="K/N: only every N-th architecture, starting at the K-th (0-based)")
    parser.add_argument("--only", choices=("with", "without"), help="run only the flows with / without bufferfix")
    parser.add_argument("--outputs-in", help="compare outputs only in these flows (comma-separated; default all)")
    parser.add_argument("names", nargs="*", help="only these (default: all)")
    args = parser.parse_args(argv)
    if args.from_json:
        print(summary(merged(args.from_json)))
        return 0
    if not args.report:
        parser.print_help()
        return 2
    known = architectures()
    names = args.names or interleaved([n for n in known if not args.family or known[n] in args.family], known)
    if args.shard:
        k, n = map(int, args.shard.split("/"))
        names = names[k::n]
    results = []
    for name in names:
        result = check(name, known.get(name), with_bufferfix=args.only != "without",
                       without_bufferfix=args.only != "with",
                       output_flows=args.outputs_in.split(",") if args.outputs_in else None)
        results.append(result)
        state = ("HARNESS ERROR: " + result.harness_error if result.harness_error
                 else "skipped: " + result.skipped if result.skipped
                 else "BROKEN with bufferfix" + ("" if result.silently_broken() else " (warned)")
                 if result.broken() else "ok" + (" (buffers broken without)" if result.broken(False) else ""))
        print("%-45s %-22s %6.1fs %s" % (name, result.family, result.seconds, state[:150]), flush=True)
        if args.json:
            write_json(args.json, results)
    print()
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
