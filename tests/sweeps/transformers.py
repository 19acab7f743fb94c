"""The architecture sweep (issue 3): every model transformers ships, made tiny, through every meta flow.

For each ``model_type`` in transformers' auto mappings this builds a tiny config (generic: size
attributes are overridden in the config and in its sub-configs), a normal reference on CPU
(``torch.manual_seed(0)``), and then runs every flow of :data:`bufferfix.flows.FLOWS` plus
``save_pretrained`` -> ``from_pretrained``, once with bufferfix and once without.  Each
materialised model is compared bit for bit with the reference: non-persistent buffers, plain tensor
attributes, which of them share storage, the state dict, and the outputs of a forward pass when a
generic input exists (``input_ids``, ``pixel_values``, ``input_values``, ``input_features``).

Used by ``tests/test_architecture_sweep.py``, and runnable on its own::

    python tests/sweep.py --report                 # every architecture (tens of minutes)
    python tests/sweep.py --report llama bert t5   # some
    python tests/sweep.py --report --json out.json # also keep every result

Nothing is downloaded: configs are the library defaults, shrunk.
"""
import argparse
import contextlib
import copy
import dataclasses
import functools
import gc
import inspect
import json
import os
import re
import signal
import sys
import tempfile
import time
import traceback
import warnings

import torch

import bufferfix
from bufferfix.flows import FLOWS, uninitialised_memory_is_poisoned
from bufferfix.tools.compare import identical, non_persistent_buffers, sharing, tensor_attributes

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing here needs the hub

import transformers
from transformers.models.auto import configuration_auto, modeling_auto

from bufferfix.tools.tiny_configs import LEVELS, VOCAB, tiny_config

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

FROM_PRETRAINED = "from_pretrained"
ALL_FLOWS = list(FLOWS) + [FROM_PRETRAINED]

MAX_PARAMETERS = 80_000_000  # a config still bigger than this after shrinking is skipped, not built
TIME_LIMIT_S = 300  # per architecture, everything included
MEMORY_LIMIT = 4 * 2**30  # per architecture: more address space than this and its allocations fail

# --------------------------------------------------------------------------- which architectures

# Preferred model class per model_type: the bare model, else the first head model found.
_MAPPINGS = ["MODEL_MAPPING_NAMES"] + sorted(
    name for name in dir(modeling_auto)
    if name.startswith("MODEL_") and name.endswith("_MAPPING_NAMES") and name != "MODEL_MAPPING_NAMES")


def architectures():
    """{model_type: model class name or None} for every model_type transformers knows."""
    found = {}
    for mapping in _MAPPINGS:
        for model_type, names in getattr(modeling_auto, mapping).items():
            if model_type in configuration_auto.CONFIG_MAPPING_NAMES:
                found.setdefault(model_type, names[0] if isinstance(names, (list, tuple)) else names)
    return {model_type: found.get(model_type) for model_type in configuration_auto.CONFIG_MAPPING_NAMES}


@functools.cache
def _parents():
    """{model_type of a sub-config: [model_types whose config holds it]}."""
    parents = {}
    for model_type in configuration_auto.CONFIG_MAPPING_NAMES:
        try:
            subs = getattr(configuration_auto.CONFIG_MAPPING[model_type], "sub_configs", None)
        except Exception:  # noqa: BLE001
            continue
        if not isinstance(subs, dict):
            continue
        for sub in subs.values():
            if getattr(sub, "model_type", None):
                parents.setdefault(sub.model_type, []).append(model_type)
    return parents


# --------------------------------------------------------------------------- results


_TENSOR_KINDS = ("buffer", "attribute", "sharing", "state")  # see differences(); and "output"


@dataclasses.dataclass
class FlowResult:
    error: str = None  # the flow itself (build, materialise, load) raised
    differences: dict = dataclasses.field(default_factory=dict)  # kind -> [names that differ]
    warnings: list = dataclasses.field(default_factory=list)  # bufferfix warnings


@dataclasses.dataclass
class Result:
    model_type: str
    class_name: str = None
    skipped: str = None  # why this architecture was not built
    harness_error: str = None  # the sweep itself failed on this architecture: a bug to fix here
    level: str = None  # how far its config was shrunk
    parameters: int = 0
    buffers: list = dataclasses.field(default_factory=list)  # non-persistent buffers of the reference
    attributes: list = dataclasses.field(default_factory=list)  # plain tensor attributes of the reference
    inputs: str = None  # what the outputs were compared on, or why they were not
    with_bufferfix: dict = dataclasses.field(default_factory=dict)  # flow -> FlowResult
    without_bufferfix: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    def problems(self, flow, enabled=True):
        """What is wrong in one flow, [] when it gives the reference (or cannot run at all).

        A flow that raises both with and without bufferfix does not apply to this model; a state
        difference that shows up both ways is the flow's or transformers' doing (outputs cannot be
        judged then), not a buffer problem.
        """
        ours, other = ((self.with_bufferfix, self.without_bufferfix) if enabled
                       else (self.without_bufferfix, self.with_bufferfix))
        ours, other = ours.get(flow), other.get(flow)
        if ours is None:
            return []
        if ours.error:
            return [] if other is not None and other.error else ["raised: " + ours.error]
        kinds = {kind: names for kind, names in ours.differences.items() if names}
        if other is None or other.error:
            pass
        elif "state" in kinds and other.differences.get("state") == kinds["state"]:
            kinds.pop("state")
            kinds.pop("output", None)
        elif ("output" in kinds and other.differences.get("output") == kinds["output"]
              and not any(ours.differences.get(k) or other.differences.get(k) for k in _TENSOR_KINDS)):
            # Same outputs both ways and every tensor right both ways: the flow's own numerics (4.x
            # from_pretrained's unaligned mmap'd weights pick other conv kernels), not a buffer.
            kinds.pop("output")
        return ["%s: %s" % (kind, ", ".join(names[:8]) + (" (+%d)" % (len(names) - 8) if len(names) > 8 else ""))
                for kind, names in kinds.items()]

    def broken(self, enabled=True):
        return {flow: self.problems(flow, enabled) for flow in ALL_FLOWS if self.problems(flow, enabled)}

    def describe(self, enabled=True):
        lines = ["%s (%s, config %s):" % (self.model_type, self.class_name, self.level)]
        results = self.with_bufferfix if enabled else self.without_bufferfix
        for flow, problems in self.broken(enabled).items():
            lines.append("  %s: %s" % (flow, "; ".join(problems)))
            lines += ["    warning: " + w for w in results[flow].warnings]
        return "\n".join(lines)

    def to_json(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d):
        d = dict(d)
        for key in ("with_bufferfix", "without_bufferfix"):
            d[key] = {flow: FlowResult(**r) for flow, r in d[key].items()}
        return cls(**d)


# --------------------------------------------------------------------------- comparison


def _names_differing(ours, theirs):
    names = sorted(set(ours) ^ set(theirs))
    return names + sorted(n for n in set(ours) & set(theirs) if not identical(ours[n], theirs[n]))


def differences(model, reference):
    """Everything that differs from the reference, by kind (see :class:`FlowResult`)."""
    everything = lambda m: {**{"buffer " + k: v for k, v in m.named_buffers(remove_duplicate=False)},  # noqa: E731
                            **{"attribute " + k: v for k, v in tensor_attributes(m).items()}}
    ours, theirs = sharing(everything(model)), sharing(everything(reference))
    return {
        "buffer": _names_differing(non_persistent_buffers(model), non_persistent_buffers(reference)),
        "attribute": _names_differing(tensor_attributes(model), tensor_attributes(reference)),
        "sharing": sorted(n for n in set(ours) | set(theirs) if ours.get(n) != theirs.get(n)),
        "state": _names_differing(model.state_dict(), reference.state_dict()),
    }


def _tensors(output):
    """Every tensor in a model output, in order (caches and other objects are left out)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):  # ModelOutput too
        return [t for value in output.values() for t in _tensors(value)]
    if isinstance(output, (list, tuple)):
        return [t for value in output for t in _tensors(value)]
    return []


def _first(config, *keys, default=None, depth=3):
    """A config value, looked for in the config and then in its sub-configs."""
    for key in keys:
        if isinstance(getattr(config, key, None), (int, list, tuple)):
            return getattr(config, key)
    for sub in ("vision_config", "encoder_config", "audio_config", "encoder"):
        sub = getattr(config, sub, None)
        if depth and isinstance(sub, transformers.PretrainedConfig) and sub is not config:
            return _first(sub, *keys, default=default, depth=depth - 1)
    return default


def generic_inputs(model):
    """Candidate forward inputs built from the model's main input, most likely first ([] when none)."""
    config, name = model.config, getattr(model, "main_input_name", "input_ids")
    generator = torch.Generator().manual_seed(1)
    accepted = inspect.signature(model.forward).parameters
    encoder_decoder = getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in accepted
    decoder = dict(decoder_input_ids=torch.tensor([[1, 2, 3, 4, 5]] * 2)) if encoder_decoder else {}
    size = _first(config, "image_size", default=224)
    size = tuple(size)[:2] if isinstance(size, (list, tuple)) else (size, size)
    pixels = torch.randn(2, _first(config, "num_channels", default=3), *size, generator=generator)
    if name == "input_ids":
        vocab = _first(config, "vocab_size") or getattr(getattr(config, "text_config", None), "vocab_size", None)
        if not isinstance(vocab, int):
            return []
        ids = dict(input_ids=torch.randint(3, max(4, min(vocab, VOCAB) - 16), (2, 8), generator=generator))
        with_pixels = [dict(ids, pixel_values=pixels)] if "pixel_values" in accepted else []  # CLIP-like
        return [dict(ids, **decoder)] + with_pixels
    if name == "pixel_values":
        return [dict(pixel_values=pixels)]
    if name == "input_values":
        audio = torch.randn(2, 4000, generator=generator)
        return [dict(input_values=audio), dict(input_values=audio[:, None])]
    if name == "input_features":
        bins = _first(config, "num_mel_bins", "feature_size", "input_feat_per_channel", default=80)
        frames = 2 * (_first(config, "max_source_positions", default=32) or 32)  # Whisper wants exactly this
        return [dict(input_features=torch.randn(2, bins, frames, generator=generator), **decoder),
                dict(input_features=torch.randn(2, 64, bins, generator=generator), **decoder)]
    return []


def run_forward(model, inputs):
    torch.manual_seed(0)
    with torch.no_grad():
        return [t.detach().clone() for t in _tensors(model.eval()(**inputs))]


def _same_outputs(a, b):
    return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------- running the flows


class _TimeLimit(Exception):
    pass


class _CannotBuild(Exception):
    """No level of shrinking gives a model that builds; the message lists what each level gave."""


@contextlib.contextmanager
def time_limit(seconds):
    """SIGALRM-based: a hung or huge build becomes an exception (main thread, POSIX only)."""
    if not hasattr(signal, "SIGALRM") or seconds is None:  # None: no limit
        yield
        return

    def expired(signum, frame):
        raise _TimeLimit("over the %d s time limit" % seconds)

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def no_network():
    """Nothing may be downloaded (some default configs name hub checkpoints): the hub libraries are put
    in offline mode, even when they were imported before HF_HUB_OFFLINE was set (they read it once),
    and any connection attempt fails."""
    import socket

    import huggingface_hub.constants
    import transformers.utils.hub

    def refuse(self, *args, **kwargs):
        raise OSError("the architecture sweep is offline: no connection to %s" % (args[:1],))

    flags = [(huggingface_hub.constants, "HF_HUB_OFFLINE"), (transformers.utils.hub, "_is_offline_mode")]
    flags = [(module, name, getattr(module, name)) for module, name in flags if hasattr(module, name)]
    connect, socket.socket.connect = socket.socket.connect, refuse
    for module, name, _ in flags:
        setattr(module, name, True)
    try:
        yield
    finally:
        socket.socket.connect = connect
        for module, name, value in flags:
            setattr(module, name, value)


@contextlib.contextmanager
def memory_limit(extra_bytes):
    """Allocations beyond ``extra_bytes`` more address space fail (some default configs would allocate
    16 GB buffers) instead of taking the machine down.  Linux only; elsewhere no limit."""
    try:
        import resource

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


def bufferfix_enabled(enabled):
    return contextlib.nullcontext() if enabled else bufferfix.disabled()


def _error(exc):
    text = " / ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return "%s: %s" % (type(exc).__name__, text[:400])


def _from_pretrained(build, reference):
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        return type(reference).from_pretrained(directory)


def run_flow(flow, build, reference, inputs=None, expected=None, lazy=False):
    """One flow's :class:`FlowResult`.  ``lazy``: skip the forward pass once buffers are known broken."""
    result = FlowResult()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if flow == FROM_PRETRAINED:
                model = _from_pretrained(build, reference)
            else:
                model = FLOWS[flow](build, reference.state_dict())
        except _TimeLimit:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded, judged by the caller
            result.error = _error(exc)
            model = None
    result.warnings = sorted({str(w.message) for w in caught if issubclass(w.category, bufferfix.BufferFixWarning)})
    if model is None:
        return result
    model.eval()  # as the reference is (some modules cache tensors in train(False))
    result.differences = differences(model, reference)
    if lazy and any(result.differences[kind] for kind in ("buffer", "attribute")):
        return result
    if inputs is not None and expected is not None:
        try:
            same = _same_outputs(run_forward(model, inputs), expected)
            result.differences["output"] = [] if same else ["outputs differ from the reference"]
        except _TimeLimit:
            raise
        except Exception as exc:  # noqa: BLE001
            result.differences["output"] = ["forward raised " + _error(exc)]
    return result


def _skip_reason(exc):
    text = _error(exc)
    if isinstance(exc, ImportError) or re.search(r"requires the|pip install|is not installed|No module named", text):
        return "needs extra dependencies: " + text
    return text


def build_reference(model_type, class_name):
    """(level, config, model class, reference) for the smallest config that builds, or raises."""
    cls = getattr(transformers, class_name)
    if not hasattr(cls, "config_class") and not inspect.isclass(cls):
        raise TypeError("%s is not a model class" % class_name)
    errors = []
    for level, what in LEVELS:
        try:
            config = tiny_config(model_type, what)
            from accelerate import init_empty_weights

            with bufferfix_enabled(False), init_empty_weights():  # size it first, without touching weights
                sized = cls(copy.deepcopy(config))
            parameters = sum(p.numel() for p in sized.parameters())
            del sized
            if parameters > MAX_PARAMETERS:  # the levels after this one shrink less: bigger still
                errors.append("%s: %.1fM parameters, over the %dM limit" % (level, parameters / 1e6,
                                                                            MAX_PARAMETERS // 10**6))
                break
            torch.manual_seed(0)
            reference = cls(copy.deepcopy(config)).eval()
            return level, config, cls, reference
        except _TimeLimit:
            raise
        except Exception as exc:  # noqa: BLE001
            errors.append("%s: %s" % (level, _skip_reason(exc)))
            if "needs extra dependencies" in errors[-1]:
                break
    raise _CannotBuild(" | ".join(errors))


def check(model_type, class_name=None, time_limit_s=TIME_LIMIT_S):
    """Build ``model_type`` tiny and run every flow with and without bufferfix."""
    class_name = class_name or architectures().get(model_type)
    result = Result(model_type, class_name)
    if class_name is None:
        parents = _parents().get(model_type)
        result.skipped = "no model class in transformers' auto mappings" + (
            " (a sub-config, built inside %s)" % ", ".join(parents[:3]) if parents else "")
        return result
    start, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead, more so on a busy machine
    try:
        with time_limit(time_limit_s), memory_limit(MEMORY_LIMIT), no_network(), uninitialised_memory_is_poisoned():
            _check(result)
    except _TimeLimit as exc:
        result.skipped = result.skipped or "over the time limit (%s)" % exc
    except Exception as exc:  # noqa: BLE001
        result.harness_error = "%s\n%s" % (_error(exc), traceback.format_exc())
    finally:
        torch.set_num_threads(threads)
        result.seconds = round(time.perf_counter() - start, 2)
        gc.collect()
    return result


def _reference_outputs(reference, build, result):
    """(inputs, outputs) of a normal build for the first generic input it accepts, or (None, None).

    The forward runs on a second normal build: a forward may cache tensors on modules, and the
    reference must stay as built.  That second build must equal the reference, or nothing can be
    compared bit for bit.
    """
    candidates = generic_inputs(reference)
    second = build().eval()
    unreproducible = {kind: names for kind, names in differences(second, reference).items() if names}
    if unreproducible:
        result.skipped = "two seeded normal builds differ, nothing to compare against: %s" % unreproducible
        return None, None
    reference = second
    result.inputs = "not compared: no generic input for %s" % getattr(reference, "main_input_name", "?")
    for inputs in candidates:
        try:
            expected = run_forward(reference, inputs)
        except _TimeLimit:
            raise
        except Exception as exc:  # noqa: BLE001
            result.inputs = "not compared: the reference's forward raised " + _error(exc)
            continue
        if not _same_outputs(expected, run_forward(reference, inputs)):
            result.inputs = "not compared: the reference's outputs are not deterministic"
            return None, None
        result.inputs = "compared on " + ", ".join("%s %s" % (k, tuple(v.shape)) for k, v in inputs.items())
        return inputs, expected
    return None, None


def _check(result):
    try:
        result.level, config, cls, reference = build_reference(result.model_type, result.class_name)
    except _TimeLimit:
        raise
    except Exception as exc:  # noqa: BLE001
        result.skipped = "cannot build: " + (str(exc) if isinstance(exc, _CannotBuild) else _skip_reason(exc))
        return
    result.parameters = sum(p.numel() for p in reference.parameters())
    result.buffers = sorted(non_persistent_buffers(reference))
    result.attributes = sorted(tensor_attributes(reference))

    def build():
        torch.manual_seed(0)
        return cls(copy.deepcopy(config))

    inputs, expected = _reference_outputs(reference, build, result)
    if result.skipped:
        return
    for flow in ALL_FLOWS:
        result.with_bufferfix[flow] = run_flow(flow, build, reference, inputs, expected)
        with bufferfix_enabled(False):
            result.without_bufferfix[flow] = run_flow(flow, build, reference, inputs, expected, lazy=True)


# --------------------------------------------------------------------------- report


def skip_category(reason):
    if reason.startswith("no model class"):
        return "no model class of its own in the auto mappings (mostly sub-configs, covered inside their parent)"
    if "needs extra dependencies" in reason:
        return "needs a library that is not installed (timm, PIL, scipy, natten, torchaudio, ...)"
    if "module transformers has no attribute" in reason:
        return "the auto mapping names a class transformers does not export"
    if "huggingface.co" in reason or "Can't load the configuration" in reason:
        return "default config names a hub checkpoint (the sweep is offline: nothing is downloaded)"
    tries = reason.split(" | ")
    if "parameters, over the" in tries[-1] or "can't allocate memory" in tries[-1]:
        if len(tries) == 1:
            return "over the parameter limit even with the tiny config"
        return "tiny config rejected (a constraint the generic shrinking misses), bigger ones over the size limits"
    if tries[-1].startswith("default config:"):
        return "does not build from its default config either (None defaults, composites needing sub-configs)"
    return "other: " + reason[:80]


def summary(results, version=None):
    """The four numbers, the skipped architectures and what is broken, as text."""
    results = sorted(results, key=lambda r: r.model_type)
    version = version or transformers.__version__
    built = [r for r in results if not r.skipped and not r.harness_error]
    with_buffers = [r for r in built if r.buffers]
    broken_without = [r for r in built if r.broken(enabled=False)]
    broken_with = [r for r in built if r.broken(enabled=True)]
    compared = [r for r in built if r.inputs and r.inputs.startswith("compared")]
    lines = [
        "transformers %s" % version,
        "architectures (model types): %d" % len(results),
        "built (tiny or small enough):                %d" % len(built),
        "with non-persistent buffers:                 %d" % len(with_buffers),
        "broken without bufferfix (some flow):        %d" % len(broken_without),
        "broken with bufferfix (some flow):           %d" % len(broken_with),
        "  (plain tensor attributes: %d; outputs compared: %d; skipped: %d)"
        % (len([r for r in built if r.attributes]), len(compared), len(results) - len(built)),
        "",
        "broken without bufferfix, per flow: " + ", ".join(
            "%s %d" % (flow, sum(1 for r in built if r.problems(flow, enabled=False))) for flow in ALL_FLOWS),
        "broken with bufferfix, per flow:    " + ", ".join(
            "%s %d" % (flow, sum(1 for r in built if r.problems(flow, enabled=True))) for flow in ALL_FLOWS),
        "flow raises with and without bufferfix (does not apply, not counted): " + ", ".join(
            "%s %d" % (flow, sum(1 for r in built if r.with_bufferfix[flow].error and r.without_bufferfix[flow].error))
            for flow in ALL_FLOWS),
        "",
        "BROKEN WITH BUFFERFIX:" if broken_with else "broken with bufferfix: none",
    ]
    lines += [r.describe(enabled=True) for r in broken_with]
    warned = ["  %s / %s: %s" % (r.model_type, flow, w) for r in built for flow, f in r.with_bufferfix.items()
              for w in f.warnings]
    lines += ["", "bufferfix warnings (with bufferfix): %s" % (len(warned) or "none")] + warned[:50]
    errors = ["  %s: %s" % (r.model_type, r.harness_error.splitlines()[0]) for r in results if r.harness_error]
    lines += ["", "HARNESS ERRORS (bugs of the sweep):" if errors else "harness errors: none"] + errors
    categories = {}
    for r in results:
        if r.skipped:
            categories.setdefault(skip_category(r.skipped), []).append(r.model_type)
    lines += ["", "skipped, by reason:"] + ["  %4d  %s" % (len(names), category) for category, names in
                                             sorted(categories.items(), key=lambda item: -len(item[1]))]
    lines += ["", "skipped:"] + ["  %s: %s" % (r.model_type, r.skipped) for r in results if r.skipped]
    return "\n".join(lines)


def write_json(path, results):
    with open(path, "w") as f:
        json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
                   "results": [r.to_json() for r in results]}, f)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", action="store_true", help="run the sweep and print the summary")
    parser.add_argument("--json", help="also write every result to this file")
    parser.add_argument("--from-json", help="only print the summary of an earlier --json run")
    parser.add_argument("model_types", nargs="*", help="only these (default: all)")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        print(summary([Result.from_json(d) for d in saved["results"]], saved["transformers"]))
        return 0
    if not args.report:
        parser.print_help()
        return 2
    known = architectures()
    results = []
    for model_type in args.model_types or sorted(known):
        result = check(model_type, known.get(model_type))
        results.append(result)
        state = ("HARNESS ERROR: " + result.harness_error if result.harness_error
                 else "skipped: " + result.skipped if result.skipped
                 else "BROKEN with bufferfix" if result.broken() else "ok")
        print("%-40s %6.1fs %s" % (model_type, result.seconds, state[:160]), flush=True)
        if args.json:
            write_json(args.json, results)
    print()
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
