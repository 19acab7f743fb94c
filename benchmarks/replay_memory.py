"""Transient memory of replays with real parameters (issue 14), measured.

A constructor that computes a buffer from a parameter, or on a parameter's device (timm's Swin
``attn_mask``, ``RotaryEmbeddingMixed``'s ``t_x`` / ``t_y``), cannot be replayed with its
parameters on meta; bufferfix replays that one module's constructor again with real parameters
and frees them as soon as it returns.  This measures what that costs while a meta-built model is
materialised (``with torch.device("meta")`` -> ``to_empty`` -> ``load_state_dict``):

* every real parameter created during the materialisation is watched (a global
  parameter-registration hook, weak references): the peak of those alive at once, their total,
  and whether any outlives the call;
* set against the model's parameter bytes and the largest replayed module's.

    python benchmarks/replay_memory.py                       # timm Swin-B if timm is installed, else a stand-in
    python benchmarks/replay_memory.py --model swin_tiny_patch4_window7_224 --json out.json

Prints one table row per model; ``--json`` writes them.
"""
import argparse
import json
import time
import weakref

import torch
from torch import nn

import bufferfix  # noqa: F401 - before torch builds anything


class _Block(nn.Module):
    """Swin-like stand-in: a mask made on a parameter's device."""

    def __init__(self, dim, shift):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        index = torch.arange(49, device=self.norm.weight.device)
        self.register_buffer("attn_mask", (index[:, None] - index[None, :] + shift).remainder(7).eq(0).float(),
                             persistent=False)


class StandIn(nn.Module):
    def __init__(self, dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2)):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(dim, shift) for dim, depth in zip(dims, depths) for shift in range(depth)])


def _builder(model):
    if model == "stand-in":
        return StandIn
    import timm

    return lambda: timm.create_model(model, pretrained=False)


def _nbytes(parameters):
    return sum(p.numel() * p.element_size() for p in parameters)


def measure(model):
    build = _builder(model)
    torch.manual_seed(0)
    reference = build()
    state = reference.state_dict()
    with torch.device("meta"):
        meta = build()
    alive, peak, total = [], [0], [0]

    def watch(module, name, param):
        if param is not None and not param.is_meta:
            size = param.numel() * param.element_size()
            alive.append((weakref.ref(param), size))
            total[0] += size
            peak[0] = max(peak[0], sum(s for ref, s in alive if ref() is not None))

    handle = nn.modules.module.register_module_parameter_registration_hook(watch)
    start = time.perf_counter()
    try:
        meta.to_empty(device="cpu")
    finally:
        handle.remove()
    seconds = time.perf_counter() - start
    meta.load_state_dict(state)
    leaked = sum(1 for ref, _ in alive if ref() is not None)
    buffers = dict(reference.named_buffers())
    exact = all(torch.equal(t, buffers[n]) for n, t in meta.named_buffers())
    # The module whose constructor is replayed is the one owning the buffer (or its nearest
    # recorded ancestor): the largest module owning a non-persistent buffer bounds one replay.
    largest = max((_nbytes(m.parameters()) for m in reference.modules()
                   if any(name in m._non_persistent_buffers_set for name in m._buffers)), default=0)
    return {
        "model": model, "parameter_bytes": _nbytes(reference.parameters()), "peak_transient_bytes": peak[0],
        "total_transient_bytes": total[0], "largest_replayed_module_bytes": largest, "left_alive": leaked,
        "to_empty_seconds": round(seconds, 3), "buffers_exact": exact,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="a timm model name or 'stand-in' (repeatable)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    models = args.model
    if not models:
        try:
            import timm  # noqa: F401

            models = ["swin_base_patch4_window7_224"]
        except ImportError:
            models = ["stand-in"]
    rows = [measure(model) for model in models]
    print("%-30s %10s %15s %17s %16s %6s %11s %6s" % (
        "model", "params MiB", "peak replay MiB", "largest owner MiB", "total replay MiB", "alive", "to_empty s",
        "exact"))
    for row in rows:
        print("%-30s %10.1f %15.2f %17.2f %16.1f %6d %11.2f %6s" % (
            row["model"], row["parameter_bytes"] / 2**20, row["peak_transient_bytes"] / 2**20,
            row["largest_replayed_module_bytes"] / 2**20, row["total_transient_bytes"] / 2**20, row["left_alive"],
            row["to_empty_seconds"], row["buffers_exact"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
