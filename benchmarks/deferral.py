"""Does holding replays back past transformers' ``_init_weights`` (deferral) pay?

    python benchmarks/deferral.py            # seven checkpoints, ~20 min on 2 shared cores
    python benchmarks/deferral.py --quick    # tiny sizes, a smoke run (< 1 min)

transformers 5's ``from_pretrained`` builds on meta, swaps every non-persistent buffer for
``torch.empty_like`` memory (``_move_missing_keys_from_meta_to_device``) and then runs
``_init_weights`` (``_initialize_missing_keys``), which recomputes the buffers of transformers'
own models.  bufferfix can fill the buffers that only a constructor replay can give

* after ``_init_weights``, leaving it the ones it overwrites (``deferred``, the default), or
* right after the move, every one of them, which ``_init_weights`` then overwrites again
  (``immediate``: ``INTEGRATION.deferring = False`` on the transformers integration).

The deferral counts transformers' own init functions (``transformers.initialization.constant_``
& co.) as overwriting: while ``_init_weights`` runs, transformers puts them in place of
``torch.nn.init``'s, so the deferral's torch function mode sees them, not torch's.

Each checkpoint (written with ``save_pretrained`` into a temporary folder) is loaded in four
variants, interleaved one call at a time in one process, the order rotated every round: those
three, ``unpatched`` and ``unpatched-A/A`` (both inside ``bufferfix.disabled()``: their ratio is
what this machine's noise alone does to a ratio).  Times are medians of wall time
(``perf_counter``) and of this process's CPU time (``process_time``: steadier when other
processes share the cores) for the whole ``from_pretrained`` and for
``PreTrainedModel._finalize_model_loading`` alone (the move, ``_init_weights`` and everything
bufferfix does there; weight loading excluded), each as a ratio to ``unpatched``.  Every variant
counts the calls to ``recipes.replay``, the constructor replays actually run
(``recipes._replay_uncached``) and the wall time spent in them, and what the deferral left to
``_init_weights``.

Correctness: once per variant, with uninitialised memory poisoned (NaN / max int, so the
allocator cannot hand back the right bytes by chance), and in every timed call, each buffer and
plain tensor attribute of the loaded model is compared with a normal build ``Model(config)``
holding the same weights: value, dtype and device, bit for bit.  The parameters are compared
once per variant.

Checkpoints: ``LlamaForCausalLM`` (one rotary module, written by ``_init_weights`` with
``copy_``), ``Gemma3nForCausalLM`` (also scalar buffers on many modules and on the whole text
model, written with ``constant_``: a replay of the text model builds all of it again) and
``RopeLM``, a ``PreTrainedModel`` defined here whose ``_init_weights`` does not know its
per-layer rotary and mask buffers (left as uninitialised memory without bufferfix).
"""
import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Gemma3nForCausalLM,
    Gemma3nTextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.utils import logging as hf_logging

import bufferfix
from bufferfix.flows import uninitialised_memory_is_poisoned
from bufferfix.integrations import transformers as bufferfix_transformers
from bufferfix.mechanism import deferral, recipes

VARIANTS = ("unpatched", "deferred", "immediate", "unpatched-A/A")

# --------------------------------------------------------------------------- models


class RopeConfig(PretrainedConfig):
    model_type = "bufferfix-bench-rope"

    def __init__(self, vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, max_position_embeddings=256, rope_theta=10000.0, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.intermediate_size, self.max_position_embeddings = intermediate_size, max_position_embeddings
        self.rope_theta = rope_theta
        super().__init__(**kwargs)


class RopeCache(nn.Module):
    """Rotary frequencies and cos/sin tables, all non-persistent; a name and attributes that
    transformers' generic ``_init_weights`` does not recognise."""

    def __init__(self, head_dim, max_positions, base):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        table = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        table = torch.cat((table, table), dim=-1)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos_cached", table.cos(), persistent=False)
        self.register_buffer("sin_cached", table.sin(), persistent=False)


class RopeBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.hidden_size
        self.norm = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.out = nn.Linear(hidden, hidden, bias=False)
        self.up = nn.Linear(hidden, config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, hidden, bias=False)
        self.rope = RopeCache(hidden // config.num_attention_heads, config.max_position_embeddings, config.rope_theta)
        positions = config.max_position_embeddings
        self.register_buffer("causal_mask", torch.ones(positions, positions, dtype=torch.bool).tril(),
                             persistent=False)


class RopeLM(PreTrainedModel):
    """A custom / remote-code style model: ``_init_weights`` knows its layers, not its buffers."""

    config_class = RopeConfig
    base_model_prefix = "rope"

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(RopeBlock(config) for _ in range(config.num_hidden_layers))
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def gemma3n_shape(layers, **shape):
    """Gemma3n's text model: besides its rotary buffers (written by ``_init_weights`` with
    ``copy_``), scalar non-persistent buffers on the word embedding, every AltUp and attention
    module, and on the whole text model (written with ``constant_``)."""
    return dict(shape, num_hidden_layers=layers, vocab_size_per_layer_input=shape["vocab_size"],
                hidden_size_per_layer_input=32, laurel_rank=16, num_kv_shared_layers=layers // 3,
                activation_sparsity_pattern=[0.0] * layers)


SIZES = {
    "full": {
        "llama-2x256": ("llama", dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=688, vocab_size=8192)),
        "llama-32x1024": ("llama", dict(hidden_size=1024, num_hidden_layers=32, num_attention_heads=16,
                                        num_key_value_heads=4, intermediate_size=2048, vocab_size=8192)),
        "llama-80x512": ("llama", dict(hidden_size=512, num_hidden_layers=80, num_attention_heads=8,
                                       num_key_value_heads=2, intermediate_size=1024, vocab_size=8192)),
        "gemma3n-4x256": ("gemma3n", gemma3n_shape(4, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                                                   head_dim=64, intermediate_size=512, vocab_size=8192)),
        "gemma3n-30x512": ("gemma3n", gemma3n_shape(30, hidden_size=512, num_attention_heads=4, num_key_value_heads=2,
                                                    head_dim=128, intermediate_size=1024, vocab_size=8192)),
        "custom-2x256": ("custom", dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=688, vocab_size=8192, max_position_embeddings=512)),
        "custom-32x1024": ("custom", dict(hidden_size=1024, num_hidden_layers=32, num_attention_heads=16,
                                          intermediate_size=2048, vocab_size=8192, max_position_embeddings=512)),
    },
    "quick": {
        "llama-2x64": ("llama", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=128, vocab_size=256)),
        "gemma3n-4x64": ("gemma3n", gemma3n_shape(4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                  head_dim=16, intermediate_size=128, vocab_size=256)),
        "custom-2x64": ("custom", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=128, vocab_size=256, max_position_embeddings=64)),
    },
}
CLASSES = {"llama": (LlamaConfig, LlamaForCausalLM), "gemma3n": (Gemma3nTextConfig, Gemma3nForCausalLM),
           "custom": (RopeConfig, RopeLM)}


def save_checkpoint(family, shape, path):
    """A normal build (random weights, seed 0) saved with ``save_pretrained``.  Returns the
    reference: a second normal build ``Model(config)`` holding the saved weights."""
    config_class, model_class = CLASSES[family]
    config = config_class(tie_word_embeddings=False, **shape)
    with bufferfix.disabled():
        torch.manual_seed(0)
        model = model_class(config)
        model.save_pretrained(path)
        reference = model_class(config)
        reference.load_state_dict(model.state_dict())
    counts = {"modules": sum(1 for _ in model.modules()),
              "parameters_mib": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20, 1)}
    del model
    return reference, counts


def load(family, path):
    if family != "custom":
        return AutoModelForCausalLM.from_pretrained(path)
    return RopeLM.from_pretrained(path)


# --------------------------------------------------------------------------- correctness


def tensors_of(model, parameters=False):
    """``{path: tensor}``: every buffer and plain tensor attribute (and parameter if asked)."""
    found = {}
    for path, module in model.named_modules():
        prefix = path + "." if path else ""
        for name, tensor in module._buffers.items():
            found[prefix + name] = tensor
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor):
                found[prefix + name] = value
        if parameters:
            for name, tensor in module._parameters.items():
                found[prefix + name] = tensor
    return found


def first_difference(model, reference, parameters=False):
    """``None`` when every tensor matches the normal build bit for bit, else what differs first."""
    got, expected = tensors_of(model, parameters), tensors_of(reference, parameters)
    if got.keys() != expected.keys():
        return "tensors %s vs a normal build's" % sorted(got.keys() ^ expected.keys())[:4]
    for name, want in expected.items():
        have = got[name]
        if have is None or want is None:
            if have is not want:
                return "%s: %r vs %r" % (name, have, want)
            continue
        if have.is_meta:
            return "%s is on meta" % name
        if (have.dtype, have.device, have.shape) != (want.dtype, want.device, want.shape):
            return "%s: %s %s %s vs %s %s %s" % (name, have.dtype, have.device, tuple(have.shape), want.dtype,
                                                 want.device, tuple(want.shape))
        if not torch.equal(have, want):
            return "%s differs from a normal build" % name
    return None


# --------------------------------------------------------------------------- counting


class Counters:
    """Calls of ``recipes.replay``, replays actually run, their wall time; what the deferral
    left to ``_init_weights`` and what it filled itself."""

    def __init__(self):
        self.reset()
        self._originals = {}

    def reset(self):
        self.replay_calls = self.replays = self.left_to_library = self.deferred_fills = 0
        self.replay_s = self.finalise_s = self.finalise_cpu_s = 0.0

    def snapshot(self):
        return {"replay_calls": self.replay_calls, "replays": self.replays, "replay_ms": self.replay_s * 1e3,
                "finalise_ms": self.finalise_s * 1e3, "finalise_cpu_ms": self.finalise_cpu_s * 1e3,
                "left_to_init_weights": self.left_to_library, "filled_after_deferral": self.deferred_fills}

    def install(self):
        replay, uncached = recipes.replay, recipes._replay_uncached
        left, fill = deferral.DeferredRestore.left_to_the_library, deferral.DeferredRestore.fill
        self._originals = {"replay": replay, "_replay_uncached": uncached}
        counters = self

        def counted_replay(*args, **kwargs):
            counters.replay_calls += 1
            return replay(*args, **kwargs)

        def timed_replay(*args, **kwargs):
            counters.replays += 1
            start = time.perf_counter()
            try:
                return uncached(*args, **kwargs)
            finally:
                counters.replay_s += time.perf_counter() - start

        def counted_left(self, key):
            counters.left_to_library += 1
            return left(self, key)

        def counted_fill(self, key):
            counters.deferred_fills += 1
            return fill(self, key)

        def timed_finalise(*args, **kwargs):
            cpu, wall = time.process_time(), time.perf_counter()
            try:
                return finalise(*args, **kwargs)
            finally:
                counters.finalise_s += time.perf_counter() - wall
                counters.finalise_cpu_s += time.process_time() - cpu

        recipes.replay, recipes._replay_uncached = counted_replay, timed_replay
        with bufferfix.disabled():  # under bufferfix's wrappers, which enable() puts back on top
            finalise = PreTrainedModel.__dict__["_finalize_model_loading"].__func__
            PreTrainedModel._finalize_model_loading = staticmethod(timed_finalise)
        deferral.DeferredRestore.left_to_the_library, deferral.DeferredRestore.fill = counted_left, counted_fill


# --------------------------------------------------------------------------- variants


@contextlib.contextmanager
def variant(name):
    if name.startswith("unpatched"):
        with bufferfix.disabled():
            yield
        return
    integration = bufferfix_transformers.INTEGRATION
    assert integration.active and integration.deferring, "bufferfix's transformers integration is not deferring"
    integration.deferring = name != "immediate"
    try:
        yield
    finally:
        integration.deferring = True


def call(family, path, name, counters, poisoned=False):
    """One ``from_pretrained`` in variant ``name``: (wall s, CPU s, model, counts, bufferfix warnings)."""
    gc.collect()
    counters.reset()
    with variant(name), warnings.catch_warnings(record=True) as caught, \
            (uninitialised_memory_is_poisoned() if poisoned else contextlib.nullcontext()):
        warnings.simplefilter("always")
        cpu, wall = time.process_time(), time.perf_counter()
        model = load(family, path)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    warned = [str(w.message) for w in caught if issubclass(w.category, bufferfix.BufferFixWarning)]
    return wall, cpu, model, counters.snapshot(), warned


def measure(label, family, path, reference, reps, counters, log):
    rows = {name: {"wall": [], "cpu": [], "replays": [], "replay_calls": [], "replay_ms": [],
                   "left_to_init_weights": [], "filled_after_deferral": [], "finalise_ms": [], "finalise_cpu_ms": [],
                   "problems": [], "warnings": 0}
            for name in VARIANTS}
    for name in VARIANTS:  # untimed: warm-up and the poisoned correctness check, parameters included
        _, _, model, counts, warned = call(family, path, name, counters, poisoned=True)
        rows[name]["poisoned_check"] = first_difference(model, reference, parameters=True)
        rows[name]["poisoned_warnings"] = warned
        del model
    for index in range(reps):
        turn = index % len(VARIANTS)
        order = list(VARIANTS[turn:] + VARIANTS[:turn])
        if index % 2:
            order.reverse()
        for name in order:
            wall, cpu, model, counts, warned = call(family, path, name, counters)
            row = rows[name]
            row["wall"].append(wall)
            row["cpu"].append(cpu)
            for key, value in counts.items():
                row[key].append(value)
            row["warnings"] += len(warned)
            problem = first_difference(model, reference)
            if problem:
                row["problems"].append(problem)
            del model
        log("  %s round %d/%d" % (label, index + 1, reps))
    return rows


def summarise(label, rows, counts):
    base_wall = statistics.median(rows["unpatched"]["wall"])
    base_cpu = statistics.median(rows["unpatched"]["cpu"])
    base_finalise = statistics.median(rows["unpatched"]["finalise_cpu_ms"])
    out = []
    for name in VARIANTS:
        row = rows[name]
        wall, cpu = statistics.median(row["wall"]), statistics.median(row["cpu"])
        problem = row["poisoned_check"] or (row["problems"][0] if row["problems"] else None)
        out.append({
            "size": label, **counts, "variant": name, "reps": len(row["wall"]),
            "median_ms": round(wall * 1e3, 2), "ratio": round(wall / base_wall, 4),
            "min_ms": round(min(row["wall"]) * 1e3, 2),
            "median_cpu_ms": round(cpu * 1e3, 2), "cpu_ratio": round(cpu / base_cpu, 4),
            "finalise_ms": round(statistics.median(row["finalise_ms"]), 3),
            "finalise_cpu_ms": round(statistics.median(row["finalise_cpu_ms"]), 3),
            "finalise_cpu_ratio": round(statistics.median(row["finalise_cpu_ms"]) / base_finalise, 4),
            "replays": statistics.median(row["replays"]), "replay_calls": statistics.median(row["replay_calls"]),
            "replay_ms": round(statistics.median(row["replay_ms"]), 3),
            "left_to_init_weights": statistics.median(row["left_to_init_weights"]),
            "filled_after_deferral": statistics.median(row["filled_after_deferral"]),
            "correct": problem is None, "problem": problem,
            "timed_runs_wrong": len(row["problems"]), "bufferfix_warnings": row["warnings"],
            "samples_ms": [round(x * 1e3, 2) for x in row["wall"]],
            "samples_cpu_ms": [round(x * 1e3, 2) for x in row["cpu"]],
        })
    return out


def print_table(rows):
    header = "%-15s %-16s %9s %6s %9s %6s %10s %6s %7s %9s %5s  %s" % (
        "size", "variant", "wall ms", "ratio", "cpu ms", "ratio", "final. cpu", "ratio", "replays", "replay ms",
        "left", "correct")
    print(header)
    print("-" * len(header))
    for row in rows:
        print("%-15s %-16s %9.1f %6.3f %9.1f %6.3f %10.2f %6.3f %7g %9.2f %5g  %s" % (
            row["size"], row["variant"], row["median_ms"], row["ratio"], row["median_cpu_ms"], row["cpu_ratio"],
            row["finalise_cpu_ms"], row["finalise_cpu_ratio"], row["replays"], row["replay_ms"],
            row["left_to_init_weights"], "yes" if row["correct"] else "NO: " + row["problem"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 3 rounds")
    parser.add_argument("--reps", type=int, default=None, help="rounds per size (default 40, --quick 3)")
    parser.add_argument("--only", default=None, help="comma-separated size labels")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier under load)")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if not bufferfix.is_enabled():
        sys.exit("bufferfix is not enabled (BUFFERFIX_DISABLE set?)")
    sizes = SIZES["quick" if args.quick else "full"]
    if args.only:
        sizes = {label: sizes[label] for label in args.only.split(",")}
    reps = args.reps or (3 if args.quick else 40)
    counters = Counters()
    counters.install()

    def log(message):
        print(message, file=sys.stderr, flush=True)

    rows = []
    with tempfile.TemporaryDirectory(prefix="bufferfix-deferral-") as tmp:
        for label, (family, shape) in sizes.items():
            path = os.path.join(tmp, label)
            reference, counts = save_checkpoint(family, shape, path)
            log("%s: %d modules, %.1f MiB of parameters" % (label, counts["modules"], counts["parameters_mib"]))
            measured = measure(label, family, path, reference, reps, counters, log)
            rows.extend(summarise(label, measured, counts))
            del reference
            gc.collect()
    print("torch %s, transformers %s, %d rounds, %d torch thread(s), load %s" % (
        torch.__version__, transformers.__version__, reps, args.threads, os.getloadavg()))
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                                               "reps": reps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
