"""What every worker script shares.  Workers run under ``torchrun --nproc_per_node 2``, one
process per rank, gloo on CPU; ``tests/test_distributed.py`` launches them and reads their
reports.

A worker is a dict ``{flow name: function() -> dict}``.  :func:`main` runs the flows in order,
each inside :func:`bufferfix.flows.uninitialised_memory_is_poisoned` (so a broken buffer reads as
NaN / max-int, never as leftover right bytes), and writes one JSON report per flow and rank to
``<out>/<flow>.rank<rank>.json``.  Whether bufferfix is on is decided by the launcher through
``BUFFERFIX_DISABLE``, never here.
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

import bufferfix  # first, as a user program would (a no-op under BUFFERFIX_DISABLE=1)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for compare.py

from compare import identical, non_persistent_buffers

from bufferfix.flows import uninitialised_memory_is_poisoned

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
# Collective timeout: a deadlock becomes an error well inside the launcher's time limit.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(seconds=60)
# Wrapper segments that FSDP1 / activation checkpointing / torch.compile put into module paths.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
OUT = None  # the --out folder (shared by the ranks), set by main()


def rank():
    return dist.get_rank()


def llama_config():
    import transformers

    return transformers.LlamaConfig(**TINY)


def input_ids():
    return torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))


def logits_of(model, ids=None):
    """Full logits on this rank (FSDP all-gathers the parameters it needs)."""
    with torch.no_grad():
        output = model.eval()(input_ids=input_ids() if ids is None else ids)
    return output.logits if hasattr(output, "logits") else output


def clean(name):
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def _finite_or_none(value):
    return value if math.isfinite(value) else repr(value)


def _sample(tensor):
    if tensor.is_meta:
        return "meta"
    values = tensor.detach().reshape(-1)[:3].tolist()
    return [_finite_or_none(v) if isinstance(v, float) else v for v in values]


def compare(model, reference, reference_logits=None, logits=None):
    """A JSON-able report of ``model``'s non-persistent buffers (and logits) against the reference."""
    ours = {clean(name): tensor for name, tensor in non_persistent_buffers(model).items()}
    theirs = non_persistent_buffers(reference)
    report = {
        "materialised": True,
        "missing_buffers": sorted(set(theirs) - set(ours)),
        "extra_buffers": sorted(set(ours) - set(theirs)),
        "broken_buffers": sorted(name for name in theirs if name in ours and not identical(ours[name], theirs[name])),
        "buffers": {name: {"dtype": str(tensor.dtype), "device": str(tensor.device), "sample": _sample(tensor),
                           "reference_sample": _sample(theirs[name]) if name in theirs else None}
                    for name, tensor in sorted(ours.items())},
    }
    if reference_logits is not None:
        try:
            logits = logits_of(model) if logits is None else logits
        except NotImplementedError as error:  # buffers left on meta: "Cannot copy out of meta tensor"
            report.update(logits_identical=False, logits_max_abs_diff=None, logits_error=str(error))
            return report
        difference = (logits.double() - reference_logits.double()).abs()
        report.update(
            logits_identical=identical(logits, reference_logits),
            logits_max_abs_diff=_finite_or_none(float(difference.max())),
            reference_logits_max_abs=float(reference_logits.abs().max()),
            logits_nonfinite=int((~torch.isfinite(logits)).sum()),
        )
    return report


# Collective entry points, for counting the ones made while materialising.
_COLLECTIVES = (
    "all_gather", "all_gather_into_tensor", "all_gather_object", "all_reduce", "all_to_all", "all_to_all_single",
    "barrier", "batch_isend_irecv", "broadcast", "broadcast_object_list", "gather", "gather_object", "irecv",
    "isend", "monitored_barrier", "recv", "reduce", "reduce_scatter", "reduce_scatter_tensor", "scatter",
    "scatter_object_list", "send", "new_group",
)


@contextlib.contextmanager
def counting_collectives():
    """Yield a list that collects the name of every torch.distributed collective called inside."""
    from torch.distributed import distributed_c10d

    calls = []
    saved = []
    for namespace in (dist, distributed_c10d):
        for name in _COLLECTIVES:
            original = getattr(namespace, name, None)
            if original is None:
                continue

            def counted(*args, __name=name, __original=original, **kwargs):
                calls.append(__name)
                return __original(*args, **kwargs)

            saved.append((namespace, name, original))
            setattr(namespace, name, counted)
    try:
        yield calls
    finally:
        for namespace, name, original in saved:
            setattr(namespace, name, original)


@contextlib.contextmanager
def fsdp1_sync_module_states_on_cpu():
    """torch's FSDP1 refuses ``sync_module_states=True`` for CPU tensors
    (``_check_module_states_for_sync_module_states``: "The module has CPU parameters or buffers
    when `sync_module_states=True`, which requires them to be on GPU").  That is a device check
    only: the broadcast it guards (``dist._broadcast_coalesced``) works on gloo/CPU.  Lift the check
    so the real broadcast path runs here; on a GPU nothing of this is needed."""
    from torch.distributed.fsdp import _init_utils

    original = _init_utils._check_module_states_for_sync_module_states
    _init_utils._check_module_states_for_sync_module_states = lambda module_states: None
    try:
        yield
    finally:
        _init_utils._check_module_states_for_sync_module_states = original


def _write(out, flow, record):
    path = os.path.join(out, "%s.rank%d.json" % (flow, record["rank"]))
    with open(path + ".tmp", "w") as handle:
        json.dump(record, handle, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def ends_the_job(flow):
    """Mark a flow after which some ranks leave the job: it must run last."""
    flow.ends_the_job = True
    return flow


def main(flows, description=None):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, help="folder for the per-flow, per-rank JSON reports")
    parser.add_argument("--only", default="", help="comma-separated flow names (default: all)")
    args, _ = parser.parse_known_args()
    selected = [name for name in flows if not args.only or name in args.only.split(",")]
    selected.sort(key=lambda name: getattr(flows[name], "ends_the_job", False))  # stable: keeps the order
    os.makedirs(args.out, exist_ok=True)
    global OUT
    OUT = args.out
    dist.init_process_group("gloo", timeout=PROCESS_GROUP_TIMEOUT)
    me = rank()
    for flow in selected:
        dist.barrier()  # every flow starts together (a flow may let ranks leave it at different times)
        record = {"flow": flow, "rank": me, "world_size": dist.get_world_size(),
                  "bufferfix_enabled": bufferfix.is_enabled(), "error": None}
        started = time.perf_counter()
        try:
            with uninitialised_memory_is_poisoned():
                record.update(flows[flow]())
        except Exception:  # noqa: BLE001 - reported to the test, which fails on it
            record["error"] = traceback.format_exc()
            sys.stderr.write("[rank%d] flow %s failed:\n%s" % (me, flow, record["error"]))
        record["seconds"] = round(time.perf_counter() - started, 3)
        _write(args.out, flow, record)
        print("[rank%d] %s: %.2fs%s" % (me, flow, record["seconds"], " ERROR" if record["error"] else ""), flush=True)
    dist.destroy_process_group()
