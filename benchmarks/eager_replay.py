"""What would it cost to read a constructor's inputs while they are as they were?

A replay re-runs a recorded constructor when a value is needed, and reads global state (a module-level
dict, an environment variable, a file) as it is *then*.  The one way to see that state as the
constructor saw it is to run the replay right after the meta build, before anything can change:
every distinct recorded constructor, once, since which modules will need a value is unknown then.
This measures that cost on the Llama-3-70B-shaped meta build of ``benchmarks/run.py``'s row 3:

    python benchmarks/eager_replay.py [--rounds 5] [--preset llama70b]

It prints the meta build's median time, the median time of replaying every distinct recorded
constructor of it, and the ratio (build + replays) / build: what closing the limit would make a
meta build cost.  (Only a timing: nothing here changes what bufferfix does.)
"""
import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_models

import bufferfix
from bufferfix.mechanism import recipes, recording


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--preset", default="llama70b")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = {"family": "llama", "preset": args.preset, "dtype": "bfloat16"}
    config = bench_models.make_config(spec)
    assert bufferfix.is_enabled()
    builds, replays, counts = [], [], None
    for _ in range(args.rounds):
        gc.collect()
        start = time.perf_counter()
        with torch.device("meta"):
            model = bench_models.build(spec, config)
        builds.append(time.perf_counter() - start)
        modules = [module for module in model.modules() if recording.was_recorded(module)]
        start = time.perf_counter()
        distinct = {id(recipe): recipe for recipe in map(recording.recipe_of, modules)}
        for recipe in distinct.values():
            try:
                recipes.replay(recipe)
            except recipes.ReplayError:
                pass
        replays.append(time.perf_counter() - start)
        counts = (len(modules), len(distinct))
        del model, modules, distinct
    build, replay = statistics.median(builds), statistics.median(replays)
    print("%s meta build: %.1f ms (median of %d); %d recorded modules, %d distinct constructors" %
          (args.preset, build * 1e3, args.rounds, *counts))
    print("replaying each distinct constructor once: %.1f ms; (build + replays) / build = %.2f" %
          (replay * 1e3, (build + replay) / build))


if __name__ == "__main__":
    main()
