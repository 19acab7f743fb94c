"""Instructions, not seconds: what bufferfix adds to a meta build or a from_pretrained (a diagnostic).

    python benchmarks/instructions.py [--what build,from_pretrained,constructions,moe] [--checkout PATH ...] [--gc]
                                      [--rounds N]

Timings on a shared 2-core machine move by several percent between identical runs; valgrind's
callgrind counts the instructions a piece of work executes, far steadier, though not exactly
repeatable: addresses, hence id()-keyed tables, differ per run (the unpatched 70B build moved by
1.3 M over three runs).  ``--rounds N`` counts every variant N times and gives the mean and the
range: a difference is real when the ranges do not overlap.
Each variant runs in its own interpreter under ``valgrind --tool=callgrind --instr-atstart=no``
(PYTHONHASHSEED=0, GC off while counting unless ``--gc``); the worker switches counting on and off around the
work itself (``callgrind_control -i on/off``), so imports and set-up are not counted.

Variants: ``unpatched`` (``BUFFERFIX_DISABLE=1``: nothing patched), ``bufferfix`` (this checkout),
and one per ``--checkout PATH`` (another checkout of bufferfix put first on ``PYTHONPATH``, e.g.
``git worktree add /tmp/v020 v0.2.0``).  Works:

* ``build``: two Llama-3-70B-shaped ``LlamaForCausalLM`` built under ``torch.device("meta")``
  (1047 modules each; the benchmark's row 3);
* ``from_pretrained``: two loads of a saved small Llama (row 5);
* ``moe``: one DeepSeek-V3-shaped MoE, 2 layers x 256 experts, built under meta (row 3m; needs
  transformers 4.x for one module per expert: ``--python .venv-t4/bin/python``);
* ``constructions``: 5,000 constructions under meta of a module with plain arguments
  (``Plain(4096, eps=1e-5)``) and of one with a config argument (``WithConfig(config, 3)``): the
  cost per recorded construction.

Needs valgrind (not installed by .ci/run: this is not part of the test suite).
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKS = ("build", "from_pretrained", "constructions", "moe")
UNITS = {"build": "per build", "from_pretrained": "per load", "constructions": "per construction", "moe": "per build"}
REPEATS = {"build": 2, "from_pretrained": 2, "constructions": 1, "moe": 1}  # times the work is counted

WORKER = r'''
import gc, os, subprocess, sys
sys.path.insert(0, os.environ["BENCH_DIR"])
import bufferfix, torch
from torch import nn
import bench_models
torch.set_num_threads(1)
what, pid = os.environ["BENCH_WHAT"], str(os.getpid())


def counted(label, work, repeat):
    work()  # warm-up: caches, lazy imports
    gc.collect()
    if not os.environ.get("BENCH_GC"):
        gc.disable()
    subprocess.run(["callgrind_control", "-z", pid], capture_output=True)
    subprocess.run(["callgrind_control", "-i", "on", pid], capture_output=True)
    for _ in range(repeat):
        work()
    subprocess.run(["callgrind_control", "-i", "off", pid], capture_output=True)
    subprocess.run(["callgrind_control", "-d", label, pid], capture_output=True)
    gc.enable()


repeat = int(os.environ["BENCH_REPEAT"])
if what in ("build", "moe"):  # moe: transformers 4.x, one module per expert (--python .venv-t4/bin/python)
    spec = {"build": {"family": "llama", "preset": "llama70b", "dtype": "bfloat16"},
            "moe": {"family": "moe", "preset": "deepseek-v3", "dtype": "bfloat16"}}[what]
    config = bench_models.make_config(spec)

    def build():
        with torch.device("meta"):
            bench_models.build(spec, config)

    counted(what, build, repeat)
elif what == "from_pretrained":
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()
    counted("from_pretrained", lambda: AutoModelForCausalLM.from_pretrained(os.environ["BENCH_CHECKPOINT"]), repeat)
else:
    config = bench_models.make_config({"family": "llama", "preset": "llama70b", "dtype": "bfloat16"})

    class Plain(nn.Module):
        def __init__(self, size, eps=1e-5):
            super().__init__()

    class WithConfig(nn.Module):
        def __init__(self, config, index=None):
            super().__init__()

    for label, make in (("nothing", lambda: None), ("plain", lambda: Plain(4096, eps=1e-5)),
                        ("config", lambda: WithConfig(config, 3))):
        kept = []

        def many():
            with torch.device("meta"):
                kept.extend(make() for _ in range(5000))

        counted(label, many, repeat)
        kept.clear()
'''


def count(variant, environment, what, scratch, checkpoint, python=sys.executable, round_=0):
    out = Path(scratch) / ("%s-%s-%d.out" % (what, variant, round_))
    env = {key: value for key, value in os.environ.items() if key != "BUFFERFIX_DISABLE"}
    env.update(PYTHONHASHSEED="0", BENCH_DIR=str(HERE), BENCH_WHAT=what, BENCH_REPEAT=str(REPEATS[what]),
               BENCH_CHECKPOINT=checkpoint or "",
               HF_HUB_OFFLINE="1", **environment)
    subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no", "--callgrind-out-file=%s" % out,
                    python, "-c", WORKER], env=env, cwd=scratch, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    totals = {}
    for dump in Path(scratch).glob(out.name + ".*"):
        text = dump.read_text()
        label = re.search(r"^desc: Trigger: dump (\S+)", text, re.M)
        total = re.search(r"^totals: (\d+)", text, re.M)
        if label and total:
            totals[label.group(1)] = int(total.group(1))
    if what in ("build", "from_pretrained", "moe"):
        return {what: totals[what] / REPEATS[what]}
    return {label: (totals[label] - totals["nothing"]) / 5000 for label in ("plain", "config")}


def save_checkpoint(scratch):
    code = ("import sys, torch; sys.path.insert(0, %r); import bench_models; torch.manual_seed(0); "
            "bench_models.build({'family': 'llama', 'preset': 'small', 'dtype': 'float32'}).save_pretrained(%r)"
            % (str(HERE), str(Path(scratch) / "small")))
    subprocess.run([sys.executable, "-c", code], env=dict(os.environ, BUFFERFIX_DISABLE="1"), check=True,
                   capture_output=True)
    return str(Path(scratch) / "small")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", default=",".join(WORKS), help="comma-separated: " + ", ".join(WORKS))
    parser.add_argument("--checkout", action="append", default=[], help="another bufferfix checkout to count")
    parser.add_argument("--gc", action="store_true", help="keep the garbage collector on while counting")
    parser.add_argument("--python", default=sys.executable, help="the interpreter to count in (moe: transformers 4.x)")
    parser.add_argument("--rounds", type=int, default=1, help="count every variant this many times (mean, range)")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("benchmarks/instructions.py needs valgrind (apt-get install valgrind)")
    variants = {"unpatched": {"BUFFERFIX_DISABLE": "1"}, "bufferfix": {}}
    for path in args.checkout:
        variants[Path(path).name] = {"PYTHONPATH": os.pathsep.join(filter(None, (path, os.environ.get("PYTHONPATH"))))}
    if args.gc:
        for environment in variants.values():
            environment["BENCH_GC"] = "1"
    with tempfile.TemporaryDirectory() as scratch:
        works = [what for what in args.what.split(",") if what]
        checkpoint = save_checkpoint(scratch) if "from_pretrained" in works else None
        jobs = [(what, name, round_) for round_ in range(args.rounds) for what in works for name in variants]
        with ThreadPoolExecutor(max_workers=2) as pool:
            counted = pool.map(lambda job: count(job[1], variants[job[1]], job[0], scratch, checkpoint, args.python,
                                                 job[2]), jobs)
            counts = {}
            for (what, name, _), result in zip(jobs, counted):
                for row, value in result.items():
                    counts.setdefault((what, name, row), []).append(value)
    for what in works:
        rows = [row for (work, name, row) in counts if work == what and name == "unpatched"]
        for row in rows:
            base = statistics.fmean(counts[what, "unpatched", row])
            print("%s (%s, instructions %s%s)" % (what, row, UNITS[what],
                                                   ", mean of %d rounds, range" % args.rounds if args.rounds > 1 else ""))
            for name in variants:
                values = counts[what, name, row]
                value = statistics.fmean(values)
                spread = ("  [%s .. %s]" % (f"{min(values):,.0f}", f"{max(values):,.0f}")
                          if len(values) > 1 else "")
                print("  %-20s %14s  %+12s  %.4f%s" % (name, f"{value:,.0f}", f"{value - base:,.0f}",
                                                       value / base, spread))


if __name__ == "__main__":
    main()
