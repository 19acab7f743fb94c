"""A long-lived benchmark worker: ``run.py`` starts two (bufferfix enabled, and ``BUFFERFIX_DISABLE=1``)
and alternates single repetitions between them, so that both see the same machine load.

Protocol: one JSON object per line on stdin ``{"task": name, "args": {...}}``; one JSON object per
line on the original stdout (``{"ok": true, "result": ...}`` or ``{"ok": false, "error": ...}``).
Anything libraries print goes to stderr.  The first line written is ``{"ready": ...}``.

Both workers import bufferfix first, then torch: the disabled one pays the same imports and
differs only in what bufferfix patches.  The enabled worker counts replays (calls to
``bufferfix.mechanism.recipes._replay_uncached``), times ``Materialisation`` planning and
restoring, and can take a census of bufferfix's side tables; these wrappers cost two clock
reads per call.
"""
import contextlib
import copy
import gc
import hashlib
import json
import os
import re
import sys
import time
import traceback
import weakref

_CHANNEL = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol
sys.stdout = sys.stderr

_t0 = time.perf_counter()
import bench_models  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import bufferfix  # noqa: E402  (first, as users are told to)

IMPORT_S = time.perf_counter() - _t0
ENABLED = bufferfix.is_enabled()
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))

# --------------------------------------------------------------------------- instrumentation

COUNTERS = {"replays": 0, "plan_s": 0.0, "restore_s": 0.0, "plans": 0}
_REPLAYED = []  # weak references to modules built by replays
_PEAK = {"armed": False, "bytes": 0, "snapshot_bytes": 0, "replay_bytes": 0}


def _unique_tensor_bytes(tensors):
    seen, total = set(), 0
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and not tensor.is_meta and id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.untyped_storage().nbytes() if tensor.numel() else 0
    return total


def _module_tensors(module):
    for sub in module.modules():
        yield from sub._parameters.values()
        yield from sub._buffers.values()
        for value in vars(sub).values():
            if isinstance(value, torch.Tensor):
                yield value


def _live_replay_tensors():
    for ref in _REPLAYED:
        module = ref()
        if module is not None:
            yield from _module_tensors(module)


def _snapshot_tensors():
    from bufferfix.mechanism import snapshots

    return snapshots.tensors()


if ENABLED:
    from bufferfix.mechanism import recipes as _recipes
    from bufferfix.mechanism import recording as _recording
    from bufferfix.mechanism import restore as _materialise

    _original_replay = _recipes._replay_uncached

    def _counting_replay(recipe, **kwargs):
        COUNTERS["replays"] += 1
        result = _original_replay(recipe, **kwargs)
        if isinstance(result, _recipes.Replayed):
            _REPLAYED.extend(weakref.ref(module) for module in (result.module, *result.others))
        return result

    _recipes._replay_uncached = _counting_replay

    _original_init = _materialise.Materialisation.__init__
    _original_restore = _materialise.Materialisation.restore
    _original_forget = _recording.forget
    _original_forget_all = _recording.forget_all

    def _timed_init(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return _original_init(self, *args, **kwargs)
        finally:
            COUNTERS["plan_s"] += time.perf_counter() - start
            COUNTERS["plans"] += 1

    def _timed_restore(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return _original_restore(self, *args, **kwargs)
        finally:
            COUNTERS["restore_s"] += time.perf_counter() - start

    def _measure_peak():
        # The first forget of a restore comes after every value was recovered and before any
        # recipe (and so any replay cache) is let go: what bufferfix holds then is its peak.
        if _PEAK["armed"]:
            _PEAK["armed"] = False
            snapshot_bytes = _unique_tensor_bytes(_snapshot_tensors())
            replay_bytes = _unique_tensor_bytes(_live_replay_tensors())
            if snapshot_bytes + replay_bytes > _PEAK["bytes"]:
                _PEAK.update(bytes=snapshot_bytes + replay_bytes, snapshot_bytes=snapshot_bytes,
                             replay_bytes=replay_bytes)

    def _forget_measuring_peak(module):
        _measure_peak()
        return _original_forget(module)

    def _forget_all_measuring_peak(modules):
        _measure_peak()
        return _original_forget_all(modules)

    _materialise.Materialisation.__init__ = _timed_init
    _materialise.Materialisation.restore = _timed_restore
    _recording.forget = _forget_measuring_peak
    _recording.forget_all = _forget_all_measuring_peak


def _counters_since(before):
    return {key: COUNTERS[key] - before[key] for key in COUNTERS}


def side_table_census():
    """Bytes (of real tensors) and entries bufferfix's side tables hold right now (bufferfix.held())."""
    if not ENABLED:
        return {"bytes": 0, "entries": {}}
    gc.collect()
    held = bufferfix.held()
    live_replays = [ref for ref in _REPLAYED if ref() is not None]
    entries = {"recipes": held.recipes, "snapshots": held.snapshots, "pending": held.pending,
               "replayed_modules_alive": len(live_replays)}
    total = max(held.bytes, _unique_tensor_bytes(_snapshot_tensors() + list(_live_replay_tensors())))
    return {"bytes": total, "entries": entries}


# --------------------------------------------------------------------------- memory

def _status(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def _trim():
    """Collect garbage and hand freed heap back to the OS (glibc keeps it otherwise, which makes
    RSS depend on allocation history rather than on what is alive)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def live_cpu_tensor_bytes():
    """Bytes of every CPU tensor storage alive in this process (objects made since gc.freeze())."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and not obj.is_meta:
            try:
                storage = obj.untyped_storage()
            except Exception:  # noqa: BLE001 - e.g. tensors without storage
                continue
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def forward_path_untouched(model):
    """Nothing of bufferfix's sits on the forward path: no global or per-module hooks, and
    ``nn.Module.__call__``/``_call_impl``/``forward`` are torch's own functions."""
    module_globals = nn.modules.module
    hooks = [module_globals._global_forward_hooks, module_globals._global_forward_pre_hooks,
             module_globals._global_backward_hooks, module_globals._global_backward_pre_hooks]
    if any(len(table) for table in hooks):
        return False
    for name in ("__call__", "_call_impl", "_wrapped_call_impl", "__getattr__"):
        function = nn.Module.__dict__.get(name)
        if function is not None and getattr(function, "__module__", None) != "torch.nn.modules.module":
            return False
    for module in model.modules():
        if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
            return False
        if "forward" in vars(module) or "__call__" in vars(module):
            return False
    return True


# --------------------------------------------------------------------------- helpers

STATE = {}  # cached across calls: state dicts, references, loaded models


def _spec_key(spec):
    return json.dumps(spec, sort_keys=True)


def non_persistent(model):
    """``{qualified name: tensor}`` of every non-persistent buffer (shared ones once per slot)."""
    found = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for name in module._non_persistent_buffers_set:
            tensor = module._buffers.get(name)
            if tensor is not None:
                found[(path + "." + name) if path else name] = tensor
    return found


def np_bytes(model):
    return _unique_tensor_bytes(non_persistent(model).values())


def reference_buffers(spec):
    key = "ref:" + _spec_key(spec)
    if key not in STATE:
        reference = bench_models.build_reference(spec)  # a normal CPU build: bufferfix records nothing
        STATE[key] = {name: tensor.clone() for name, tensor in non_persistent(reference).items()}
    return STATE[key]


def check_buffers(model, spec):
    """``(all correct?, first problem)`` comparing non-persistent buffers with a normal build."""
    reference = reference_buffers(spec)
    for name, tensor in non_persistent(model).items():
        expected = reference.get(name)
        if expected is None:
            expected = reference.get(re.sub(r"\.\d+\.", ".0.", name))
        if expected is None:
            return False, "%s: no reference value" % name
        if tensor.is_meta:
            return False, "%s is still on meta" % name
        if tensor.dtype != expected.dtype or tensor.shape != expected.shape:
            return False, "%s: %s %s, expected %s %s" % (name, tensor.dtype, tuple(tensor.shape), expected.dtype,
                                                          tuple(expected.shape))
        if not torch.equal(tensor, expected):
            return False, "%s differs from a normal build" % name
    return True, None


@contextlib.contextmanager
def _poisoned(on):
    if not on:
        yield
        return
    from bufferfix.flows import uninitialised_memory_is_poisoned

    with uninitialised_memory_is_poisoned():
        yield


def state_dict_for(spec):
    """A state dict of real tensors matching ``spec`` (constant values: only its copy is timed)."""
    key = "sd:" + _spec_key(spec)
    if key not in STATE:
        with torch.device("meta"):
            model = bench_models.build(spec)
        made = {}
        state = {}
        for name, tensor in model.state_dict().items():
            if id(tensor) not in made:
                made[id(tensor)] = torch.full(tensor.shape, 0.01, dtype=tensor.dtype)
            state[name] = made[id(tensor)]
        STATE[key] = state
    return STATE[key]


def _module_counts(model):
    modules = list(model.modules())
    holding = sum(1 for module in modules if any(module._buffers.get(name) is not None
                                                 for name in module._non_persistent_buffers_set))
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"modules": len(modules), "modules_with_np_buffers": holding, "parameter_bytes": parameter_bytes}


def _drop(model):
    del model
    gc.collect()


# --------------------------------------------------------------------------- tasks

def task_meta_build(spec, warmup=False):
    config = STATE.setdefault("cfg:" + _spec_key(spec),
                              bench_models.make_config(spec) if spec["family"] in ("llama", "moe") else None)
    gc.collect()
    start = time.perf_counter()
    with torch.device("meta"):
        model = bench_models.build(spec, config)
    elapsed = time.perf_counter() - start
    recorded = 0
    if ENABLED:
        recorded = bufferfix.held().recipes
    counts = _module_counts(model)
    _drop(model)
    return {"seconds": elapsed, "recipes_recorded": recorded, **counts}


def _non_persistent_fqns(model):
    return set(non_persistent(model))


def _accelerate_copy(model):
    """accelerate's FSDP2 cpu_ram_efficient_loading: deep-copy the non-persistent buffers first."""
    fqns = _non_persistent_fqns(model)
    return copy.deepcopy({name: buffer for name, buffer in model.named_buffers() if name in fqns})


def _accelerate_reassign(model, saved, device="cpu"):
    for fqn, tensor in saved.items():
        tensor = tensor.to(device)
        if "." in fqn:
            parent_name, local = fqn.rsplit(".", 1)
            parent = model.get_submodule(parent_name)
        else:
            local, parent = fqn, model
        parent.register_buffer(local, tensor, persistent=False)


def _real_model(spec):
    """A correct real model (untimed set-up for the round-trip flow)."""
    with torch.device("meta"):
        model = bench_models.build(spec)
    model.to_empty(device="cpu")
    model.load_state_dict(state_dict_for(spec))
    reference = reference_buffers(spec)
    with torch.no_grad():
        for name, tensor in non_persistent(model).items():
            tensor.copy_(reference.get(name, reference.get(re.sub(r"\.\d+\.", ".0.", name))))
    return model


def task_materialise(spec, flow, approach, poison=False, warmup=False):
    """Time one materialisation: ``flow`` "born_on_meta" (``torch.device('meta')`` build, then
    to_empty + load_state_dict) or "roundtrip" (a real model moved ``.to('meta')``, then the same);
    ``approach`` "none", "accelerate_copy", "init_weights" or "bufferfix" (the worker decides
    whether bufferfix is on; "bufferfix" runs the plain flow)."""
    state = state_dict_for(spec)
    if flow == "born_on_meta":
        with torch.device("meta"):
            model = bench_models.build(spec)
    else:
        model = _real_model(spec)
    before = dict(COUNTERS)
    _REPLAYED.clear()
    _PEAK.update(armed=True, bytes=0, snapshot_bytes=0, replay_bytes=0)
    _trim()
    rss_before = _status("VmRSS")
    peak_reset = _reset_peak_rss()
    with _poisoned(poison):
        start = time.perf_counter()
        saved = _accelerate_copy(model) if approach == "accelerate_copy" else None
        if flow == "roundtrip":
            model = model.to(torch.device("meta"))
        model.to_empty(device="cpu")
        if approach == "init_weights":
            model.init_weights()  # re-initialises every weight too, hence before the load
        model.load_state_dict(state)
        if saved is not None:
            _accelerate_reassign(model, saved)
        elapsed = time.perf_counter() - start
    peak_rss = _status("VmHWM") if peak_reset else None
    _PEAK["armed"] = False
    correct, problem = check_buffers(model, spec)
    result = {
        "seconds": elapsed, "correct": correct, "problem": problem,
        "counters": _counters_since(before), "np_bytes": np_bytes(model),
        "held_during_bytes": _PEAK["bytes"], "held_during_snapshot_bytes": _PEAK["snapshot_bytes"],
        "held_during_replay_bytes": _PEAK["replay_bytes"],
        "rss_before": rss_before, "peak_rss_delta": (peak_rss - rss_before) if peak_rss else None,
        **_module_counts(model),
    }
    _trim()
    result["rss_after_delta"] = _status("VmRSS") - rss_before
    census = side_table_census()
    result["held_after_bytes"] = census["bytes"]
    result["live_tensor_bytes_after"] = live_cpu_tensor_bytes()
    result["side_tables_after"] = census["entries"]
    _drop(model)
    return result


def task_to_empty(spec, warmup=False):
    """Scaling: build on meta (timed separately), then to_empty alone (lazy allocation: parameter
    bytes are never touched, so what grows is per-module work)."""
    config = bench_models.make_config(spec) if spec["family"] == "llama" else None
    gc.collect()
    start = time.perf_counter()
    with torch.device("meta"):
        model = bench_models.build(spec, config)
    build_s = time.perf_counter() - start
    counts = _module_counts(model)
    before = dict(COUNTERS)
    gc.collect()
    start = time.perf_counter()
    model.to_empty(device="cpu")
    elapsed = time.perf_counter() - start
    result = {"seconds": elapsed, "build_seconds": build_s, "counters": _counters_since(before),
              "np_bytes": np_bytes(model), **counts}
    _drop(model)
    result["held_after_bytes"] = side_table_census()["bytes"]
    return result


def task_save_pretrained(spec, path, constant=False):
    """Untimed set-up: save a transformers model (run in the disabled worker).  ``constant``: skip
    random initialisation (a 1B model would take minutes on one thread); weights are 0.01 and the
    non-persistent buffers those of a normal build."""
    torch.manual_seed(0)
    if constant:
        with torch.device("meta"):
            model = bench_models.build(spec)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(0.01)
            reference = reference_buffers(spec)
            for name, tensor in non_persistent(model).items():
                tensor.copy_(reference.get(name, reference.get(re.sub(r"\.\d+\.", ".0.", name))))
        model.tie_weights()
    else:
        model = bench_models.build(spec)
    model.save_pretrained(path)
    return {"path": path, **_module_counts(model)}


def task_from_pretrained(spec, path, warmup=False):
    from transformers import AutoModelForCausalLM

    gc.collect()
    before = dict(COUNTERS)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path)
    elapsed = time.perf_counter() - start
    correct, problem = check_buffers(model, spec)
    result = {"seconds": elapsed, "correct": correct, "problem": problem, "counters": _counters_since(before)}
    _drop(model)
    return result


def task_forward(spec, path, tokens, warmup=False):
    """One forward pass (no grad) of a model loaded with from_pretrained in this worker."""
    key = "fwd:" + path
    if key not in STATE:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path).eval()
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=generator)
        STATE[key] = (model, ids)
    model, ids = STATE[key]
    with torch.no_grad():
        start = time.perf_counter()
        logits = model(ids).logits
        elapsed = time.perf_counter() - start
    digest = hashlib.sha256(logits.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    return {"seconds": elapsed, "logits_sha256": digest, "forward_path_untouched": forward_path_untouched(model)}


def task_release():
    STATE.clear()
    gc.collect()
    return {"rss": _status("VmRSS")}


def task_profile(spec, top=25):
    """cProfile of a meta build, restricted to bufferfix's functions (enabled worker)."""
    import cProfile
    import io
    import pstats

    config = bench_models.make_config(spec) if spec["family"] == "llama" else None
    with torch.device("meta"):
        bench_models.build(spec, config)  # warm
    profiler = cProfile.Profile()
    profiler.enable()
    with torch.device("meta"):
        model = bench_models.build(spec, config)
    profiler.disable()
    _drop(model)
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats("bufferfix", top)
    return {"text": out.getvalue()}


def task_info():
    import platform

    info = {"enabled": ENABLED, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "import_seconds": IMPORT_S, "pid": os.getpid()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    try:
        import accelerate

        info["accelerate"] = accelerate.__version__
    except ImportError:
        info["accelerate"] = None
    info["bufferfix"] = bufferfix.__version__
    return info


TASKS = {name[len("task_"):]: function for name, function in globals().items() if name.startswith("task_")}


def main():
    import transformers
    import transformers.models.llama.modeling_llama  # noqa: F401

    # Everything imported so far lives for the whole process: keep it out of the collector's way,
    # so that gc.collect() between repetitions costs milliseconds, not a scan of all of transformers.
    gc.collect()
    gc.freeze()
    _CHANNEL.write(json.dumps({"ready": True, "enabled": ENABLED}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        try:
            response = {"ok": True, "result": TASKS[request["task"]](**request.get("args", {}))}
        except Exception as error:  # noqa: BLE001 - reported to the runner
            response = {"ok": False, "error": "%s: %s" % (type(error).__name__, error),
                        "traceback": traceback.format_exc()}
        _CHANNEL.write(json.dumps(response) + "\n")


if __name__ == "__main__":
    main()
