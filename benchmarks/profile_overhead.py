"""Where bufferfix's time goes: ablations and per-call costs (a diagnostic, not part of run.py).

    python benchmarks/profile_overhead.py [--quick] [--rounds 7]

In one process, the same work is timed with bufferfix disabled, fully enabled, and enabled with
one piece switched off at a time, alternating round by round; the difference to "enabled" is
what that piece costs.  Then the per-call cost of each bufferfix hook is timed directly.
Pieces: the nn.Module.__new__ recording (``recording.constructor_hook``; its instruction counts are
in benchmarks/README.md) and, at materialisation,
``Materialisation.__init__`` (plan), ``restore`` (of which ``recipes.forget_all`` and constructor
replay).
"""
import argparse
import contextlib
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_models
import torch
from torch import nn

import bufferfix
from bufferfix.mechanism import recipes, recording, sources
from bufferfix.mechanism import restore as materialise


@contextlib.contextmanager
def patched(obj, name, value):
    original = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, original)


VARIANTS = {
    "disabled": bufferfix.disabled,
    "enabled": contextlib.nullcontext,
}


def time_variants(work, rounds, variants=VARIANTS):
    samples = {name: [] for name in variants}
    for variant in variants.values():  # warm-up
        with variant():
            work()
    for index in range(rounds):
        names = list(variants)
        if index % 2:
            names.reverse()
        for name in names:
            with variants[name]():
                gc.collect()
                samples[name].append(work())
    medians = {name: statistics.median(values) for name, values in samples.items()}
    medians["_min"] = {name: min(values) for name, values in samples.items()}
    return medians


def report(title, medians):
    minima = medians.pop("_min")
    base, full = medians["disabled"], medians["enabled"]
    print("\n== %s" % title)
    print("  %-45s %10s %10s %12s %10s %12s" % ("variant", "median ms", "vs disabled", "saves vs enabled",
                                                "min ms", "min: saves"))
    for name, value in medians.items():
        print("  %-45s %10.2f %10.3f %12.2f %10.2f %12.2f" % (name, value * 1e3, value / base, (full - value) * 1e3,
                                                              minima[name] * 1e3,
                                                              (minima["enabled"] - minima[name]) * 1e3))


def per_call(function, calls=2000):
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--layers", type=int, default=80, help="layers of the 1B-shaped model for to_empty")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    gc.collect()
    gc.freeze()
    big = "tiny" if args.quick else "llama70b"
    spec = {"family": "llama", "preset": big, "dtype": "bfloat16"}
    config = bench_models.make_config(spec)

    def meta_build():
        start = time.perf_counter()
        with torch.device("meta"):
            model = bench_models.build(spec, config)
        elapsed = time.perf_counter() - start
        del model
        return elapsed

    medians = time_variants(meta_build, args.rounds)
    report("meta build of LlamaForCausalLM(%s)" % big, medians)
    with torch.device("meta"):
        model = bench_models.build(spec, config)
    modules = sum(1 for _ in model.modules())
    parameters = sum(1 for _ in model.parameters())
    print("  (%d modules, %d parameters; per module, enabled - disabled = %.1f us)"
          % (modules, parameters, (medians["enabled"] - medians["disabled"]) / modules * 1e6))
    del model

    # Per-call costs under torch.device("meta"), for the argument shapes a transformers model uses.
    print("\n== per-call costs (us), meta default device")
    class Probe(nn.Module):
        pass

    hook = nn.Module.__dict__["__new__"].__func__
    with torch.device("meta"):
        layer_idx = 3
        rows = {
            "meta_is_default_device()": lambda: recording.meta_is_default_device(),
            "constructor hook, Module subclass, (config, layer_idx), recorded":
                lambda: hook(Probe, config, layer_idx),
            "_argument_states((config, 3), {})  [copies vars(config)]":
                lambda: recipes.argument_states((config, 3), {}),
            "_recipe_key_part((config, 3))  [at first use only]": lambda: recipes._recipe_key_part((config, 3)),
            "_state_of(config)": lambda: recipes._state_of(config),
            "vars(config) (transformers __getattribute__)": lambda: vars(config),
            "nn.Linear(64, 64) on meta, enabled": lambda: nn.Linear(64, 64),
        }
        for name, function in rows.items():
            try:
                cost = per_call(function, 500 if "Linear(" in name else 5000)
            except AttributeError:  # a helper this version of bufferfix does not have
                continue
            print("  %-75s %8.2f" % (name, cost))
        with bufferfix.disabled():
            print("  %-75s %8.2f" % ("nn.Linear(64, 64) on meta, disabled", per_call(lambda: nn.Linear(64, 64), 500)))
        print("  vars(config) has %d attributes" % len(vars(config)))

    # from_pretrained of a small saved model: recording during its meta build vs its restore.
    import tempfile
    import warnings

    from transformers import AutoModelForCausalLM

    from bufferfix.integrations.transformers import INTEGRATION as tf_integration

    small = {"family": "llama", "preset": "tiny" if args.quick else "small", "dtype": "float32"}
    with tempfile.TemporaryDirectory() as tmp:
        bench_models.build(small).save_pretrained(tmp)

        def load():
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = AutoModelForCausalLM.from_pretrained(tmp)
            elapsed = time.perf_counter() - start
            del model
            return elapsed

        @contextlib.contextmanager
        def no_transformers_wrapper():
            tf_integration.uninstrument()
            try:
                yield
            finally:
                tf_integration.instrument(sys.modules["transformers.modeling_utils"])

        variants = {
            "disabled": bufferfix.disabled,
            "enabled": contextlib.nullcontext,
            "enabled, transformers integration removed": no_transformers_wrapper,
        }
        report("from_pretrained of a saved LlamaForCausalLM(%s)" % small["preset"], time_variants(load, args.rounds * 2,
                                                                                                variants))

    # Materialisation of a meta-built 1B-shaped model (to_empty alone: lazy allocation).
    spec1b = {"family": "llama", "preset": "tiny" if args.quick else "llama1b", "dtype": "bfloat16",
              "layers": None if args.quick else args.layers}
    config1b = bench_models.make_config(spec1b)
    totals = {}

    def timed(name, function):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    def to_empty():
        with torch.device("meta"):
            model = bench_models.build(spec1b, config1b)
        gc.collect()
        start = time.perf_counter()
        model.to_empty(device="cpu")
        return time.perf_counter() - start

    medians = time_variants(to_empty, args.rounds, {"disabled": bufferfix.disabled, "enabled": contextlib.nullcontext})
    with torch.device("meta"):
        probe = bench_models.build(spec1b, config1b)
    count = sum(1 for _ in probe.modules())
    del probe
    report("to_empty of a meta-built LlamaForCausalLM(%s, %s layers, %d modules) (lazy allocation)"
           % (spec1b["preset"], spec1b["layers"], count), medians)
    print("  (per module, enabled - disabled = %.1f us)" % ((medians["enabled"] - medians["disabled"]) / count * 1e6))
    with patched(materialise.Materialisation, "__init__", timed("plan (Materialisation.__init__)",
                                                                materialise.Materialisation.__init__)), \
            patched(materialise.Materialisation, "restore", timed("restore", materialise.Materialisation.restore)), \
            patched(recording, "forget_all", timed("  of which recipes.forget_all", recording.forget_all)), \
            patched(recipes, "_replay_uncached", timed("  of which replay (_replay_uncached)",
                                                       recipes._replay_uncached)), \
            patched(sources, "_changed_after_construction",
                    timed("  of which _changed_after_construction", sources._changed_after_construction)):
        for _ in range(args.rounds):
            to_empty()
    order = ["plan (Materialisation.__init__)", "restore", "  of which replay (_replay_uncached)",
             "  of which recipes.forget_all", "  of which _changed_after_construction"]
    for name in order:
        total = totals.get(name, 0.0)
        print("  %-55s %8.2f ms per to_empty  (%.1f us per module)" % (name, total / args.rounds * 1e3,
                                                                       total / args.rounds / count * 1e6))


if __name__ == "__main__":
    main()
