"""bufferfix benchmarks: what bufferfix costs, measured against the unpatched run in the same run.

    python benchmarks/run.py            # full sizes (~5-10 min on 2 cores; a 1B model needs ~8 GB RAM)
    python benchmarks/run.py --quick    # tiny sizes, < 60 s: a smoke run (CI)

Prints a table and writes JSON (``--json``, default ``benchmarks/results.json``, or
``benchmarks/results-quick.json`` with ``--quick``).  Every row has a ``ratio`` (with
bufferfix / without, unless the row says otherwise) and, where the project set one, a
``target``.

How the comparison is kept fair: long-lived worker processes (``benchmarks/worker.py``) run
side by side, identical except that one has bufferfix and the others ``BUFFERFIX_DISABLE=1``
(all import bufferfix, torch and transformers before any timing; disabled, bufferfix patches
nothing, so that side is plain torch).  The runner alternates single repetitions between them,
rotating the order each round, so all see the same machine load.  A timing row gives the ratio
of the medians (``ratio``) and of the fastest runs (``min_ratio``) over its interleaved rounds
(40 or more for the recording and from_pretrained rows), and beside them the same two ratios
for a second worker without bufferfix against the first (``aa_ratio`` / ``aa_min_ratio``, the
A/A column): what this machine's noise alone does to a ratio in that run.  A target is met when
both ratios are within it.
Import-time rows use fresh interpreters, alternated the same way.  Interpreter start-up
with the ``.pth`` hook (item 1) comes from ``benchmarks/startup.py`` when it exists.

Items (numbers follow GitHub issue 7):
  1  start-up with the .pth hook (benchmarks/startup.py)
  2  ``import bufferfix`` vs ``import wrapt``, torch not imported            [<= 1.10]
  3  Llama-3-70B-shaped LlamaForCausalLM built under torch.device("meta")    [<= 1.02]
  3m DeepSeek-V3-shaped MoE (2 layers x 256 experts, one module per expert: transformers
     4.x, workers run by --moe-python) built under torch.device("meta")       [<= 1.02]
  4  to_empty + load_state_dict of a Llama-3.2-1B-shaped bf16 model on CPU   [<= 1.02];
     growth from 1 to 80 layers and number of replays
  5  transformers from_pretrained of a saved small model; 5b 1B-, 5c 3B-shaped   [<= 1.02]
  6  forward pass of a model loaded with bufferfix vs without                [1.00]
  7  memory bufferfix holds during (<= bytes of the non-persistent buffers) and after (0)
  alt  what users do today: accelerate's copy-and-reassign, transformers' init_weights()

Options: --only 3,4 runs some items; --threads N sets torch threads in the workers (default 1:
steadier under load); --reps-scale F multiplies repetition counts; --profile adds a cProfile
of bufferfix's functions during the meta build; --calibrate runs everything with bufferfix in
neither worker (an A/A run: how far from 1.00 this machine's noise alone puts a ratio).
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# --------------------------------------------------------------------------- sizes

FULL = {
    "import_runs": 40, "startup_runs": 30,
    "meta_build": {"spec": {"family": "llama", "preset": "llama70b", "dtype": "bfloat16"}, "reps": 45},
    "moe_build": {"spec": {"family": "moe", "preset": "deepseek-v3", "dtype": "bfloat16"}, "reps": 40},
    "load": {"spec": {"family": "llama", "preset": "llama1b", "dtype": "bfloat16"}, "reps": 15, "slow_reps": 3},
    "perlayer": {"spec": {"family": "perlayer", "preset": "perlayer", "dtype": "float32"}, "reps": 7},
    "scaling": {"llama": {"family": "llama", "preset": "llama1b", "dtype": "bfloat16"},
                "perlayer": {"family": "perlayer", "preset": "perlayer", "dtype": "float32"},
                "layers": [1, 2, 4, 8, 16, 32, 80], "hidden": [512, 2048, 8192], "hidden_layers": 4, "reps": 7},
    "pretrained": {"spec": {"family": "llama", "preset": "small", "dtype": "float32"}, "reps": 60},
    "pretrained_big": {"spec": {"family": "llama", "preset": "llama1b", "dtype": "bfloat16"}, "reps": 40},
    "pretrained_larger": {"spec": {"family": "llama", "preset": "llama3b", "dtype": "bfloat16"}, "reps": 15},
    "forward": {"tokens": 64, "reps": 40},
}
QUICK = {
    "import_runs": 6, "startup_runs": 3,
    "meta_build": {"spec": {"family": "llama", "preset": "tiny", "dtype": "bfloat16"}, "reps": 3},
    "moe_build": {"spec": {"family": "moe", "preset": "deepseek-tiny", "dtype": "bfloat16"}, "reps": 2},
    "load": {"spec": {"family": "llama", "preset": "tiny", "dtype": "bfloat16"}, "reps": 3, "slow_reps": 2},
    "perlayer": {"spec": {"family": "perlayer", "preset": "perlayer-tiny", "dtype": "float32"}, "reps": 2},
    "scaling": {"llama": {"family": "llama", "preset": "tiny", "dtype": "bfloat16"},
                "perlayer": {"family": "perlayer", "preset": "perlayer-tiny", "dtype": "float32"},
                "layers": [1, 4], "hidden": [64, 128], "hidden_layers": 1, "reps": 2},
    "pretrained": {"spec": {"family": "llama", "preset": "tiny", "dtype": "float32"}, "reps": 3},
    "pretrained_big": {"spec": {"family": "llama", "preset": "tiny", "dtype": "bfloat16"}, "reps": 2},
    "pretrained_larger": {"spec": {"family": "llama", "preset": "tiny", "dtype": "bfloat16"}, "reps": 2},
    "forward": {"tokens": 16, "reps": 5},
}
ITEMS = ("1", "2", "3", "3m", "4", "5", "6", "7", "alt")

# --------------------------------------------------------------------------- environment


def clean_env(**extra):
    """The caller's environment without BUFFERFIX_* / PYTHON* switches (they would skew a side)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BUFFERFIX_", "PYTHON"))}
    env.update(extra)
    return env


def machine():
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), None)
        with open("/proc/meminfo") as meminfo:
            info["memory_gib"] = round(int(meminfo.readline().split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return info


def load_average():
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------- workers


class WorkerError(RuntimeError):
    pass


class Worker:
    def __init__(self, name, enabled, threads, log_dir, python=sys.executable):
        env = clean_env(BENCH_THREADS=str(threads))
        if not enabled:
            env["BUFFERFIX_DISABLE"] = "1"
        self.name = name
        self.log_path = Path(log_dir) / ("worker-%s.log" % name)
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen([python, str(HERE / "worker.py")], cwd=str(HERE), env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                        text=True, bufsize=1)

    def wait_ready(self):
        line = self.process.stdout.readline()
        if not line:
            raise WorkerError("worker %s died while starting:\n%s" % (self.name, self.log_tail()))
        return json.loads(line)

    def call(self, task, **args):
        self.process.stdin.write(json.dumps({"task": task, "args": args}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise WorkerError("worker %s died during %s:\n%s" % (self.name, task, self.log_tail()))
        response = json.loads(line)
        if not response["ok"]:
            raise WorkerError("worker %s: %s failed: %s\n%s" % (self.name, task, response["error"],
                                                                 response.get("traceback", "")))
        return response["result"]

    def log_tail(self, chars=3000):
        self._log.flush()
        return self.log_path.read_text()[-chars:]

    def close(self):
        try:
            self.process.stdin.close()
            self.process.wait(timeout=30)
        except Exception:  # noqa: BLE001
            self.process.kill()
        self._log.close()


def interleave(jobs, progress=None):
    """Run ``jobs`` (dicts: label, worker, task, args, reps; optional warmup_args) round by round,
    rotating their order each round so that no job always runs first.  One untimed warm-up
    call per job first.  Returns ``{label: {"warmup": result, "runs": [results]}}``."""
    out = {job["label"]: {"warmup": None, "runs": []} for job in jobs}
    for job in jobs:
        args = dict(job["args"], **job.get("warmup_args", {}))
        out[job["label"]]["warmup"] = job["worker"].call(job["task"], **args)
    rounds = max(job["reps"] for job in jobs)
    for index in range(rounds):
        order = jobs[index % len(jobs):] + jobs[:index % len(jobs)]
        if index % 2:
            order = order[::-1]  # ABBA-like: alternate direction too
        for job in order:
            if index < job["reps"]:
                out[job["label"]]["runs"].append(job["worker"].call(job["task"], **job["args"]))
        if progress:
            progress()
    return out


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def seconds(runs, key="seconds"):
    return [run[key] for run in runs]


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def paired_ratio(with_values, without_values):
    pairs = [w / o for w, o in zip(with_values, without_values) if o]
    return statistics.median(pairs) if pairs else None


# --------------------------------------------------------------------------- rows


class Report:
    def __init__(self):
        self.rows = []
        self.sections = {}

    def add(self, row_id, item, name, without, with_, ratio_value, target=None, unit="ms", reps=None, note=None,
            compare="max", **details):
        if target is None:
            meets = None
        elif ratio_value is None:
            meets = False
        elif compare == "max":
            meets = ratio_value <= target
        elif compare == "noise":  # the target is exact; accept what the measurement cannot resolve
            meets = ratio_value <= target + details.get("tolerance", 0.0)
        else:  # "equal"
            meets = ratio_value == target
        row = {"id": row_id, "item": item, "name": name, "unit": unit, "without": without, "with": with_,
               "ratio": None if ratio_value is None else round(ratio_value, 4), "target": target,
               "meets_target": meets, "reps": reps, "note": note}
        row.update(details)
        self.rows.append(row)
        return row

    def error(self, row_id, item, name, message):
        self.rows.append({"id": row_id, "item": item, "name": name, "unit": None, "without": None, "with": None,
                          "ratio": None, "target": None, "meets_target": False, "reps": None,
                          "note": "ERROR", "error": message})


def timing_row(report, row_id, item, name, with_runs, without_runs, target, note=None, aa_runs=None, **details):
    """A with / without row.  ``ratio`` is the ratio of the medians, ``min_ratio`` that of the fastest
    runs; ``aa_runs`` (a second worker without bufferfix, interleaved with the two) give the same
    two ratios for two identical sides: how far from 1.00 this machine's noise alone moves them.
    The target is met when both ratios are within it."""
    w, o = seconds(with_runs), seconds(without_runs)
    mw, mo = median(w), median(o)
    median_ratio, min_ratio = ratio(mw, mo), ratio(min(w), min(o))
    if aa_runs:
        a = seconds(aa_runs)
        details.update(aa_ratio=_round(ratio(median(a), mo)), aa_min_ratio=_round(ratio(min(a), min(o))),
                       samples_aa_ms=[round(x * 1e3, 3) for x in a])
    row = report.add(row_id, item, name, round(mo * 1e3, 3), round(mw * 1e3, 3), median_ratio, target,
                     reps=min(len(w), len(o)), note=note, paired_ratio=_round(paired_ratio(w, o)),
                     min_ratio=_round(min_ratio), overhead_ms=round((mw - mo) * 1e3, 3),
                     samples_without_ms=[round(x * 1e3, 3) for x in o], samples_with_ms=[round(x * 1e3, 3) for x in w],
                     min_without_ms=round(min(o) * 1e3, 3), min_with_ms=round(min(w) * 1e3, 3), **details)
    if target is not None and min_ratio is not None and row["meets_target"]:
        row["meets_target"] = min_ratio <= target
    return row


def three_way(on, off, aa, task, args, reps):
    """Interleave ``task`` on the worker with bufferfix, the one without, and the A/A one."""
    jobs = [{"label": "with", "worker": on, "task": task, "args": args, "reps": reps},
            {"label": "without", "worker": off, "task": task, "args": args, "reps": reps}]
    if aa is not None:
        jobs.append({"label": "aa", "worker": aa, "task": task, "args": args, "reps": reps})
    results = interleave(jobs)
    return results, results["aa"]["runs"] if aa is not None else None


def _round(value, digits=4):
    return None if value is None else round(value, digits)


# --------------------------------------------------------------------------- items


def item1_startup(report, sizes, tmp):
    script = HERE / "startup.py"
    if not script.exists():
        report.error("1", "1", "start-up hook (benchmarks/startup.py)", "benchmarks/startup.py does not exist")
        return
    out = Path(tmp) / "startup.json"
    command = [sys.executable, str(script), "--runs", str(sizes["startup_runs"]), "--json", str(out)]
    try:
        done = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError("exit %d: %s" % (done.returncode, (done.stderr or done.stdout)[-2000:]))
        data = json.loads(out.read_text())
        rows = {row["variant"]: row for row in data["rows"]}
    except Exception as error:  # noqa: BLE001 - another helper's script; report, don't crash
        report.error("1", "1", "start-up hook (benchmarks/startup.py)", str(error))
        return
    report.sections["startup"] = data
    names = list(rows)
    baseline = data["rows"][0]
    labels = {1: ("1a", "python -c pass: hook installed, BUFFERFIX_AUTO unset vs not installed"),
              2: ("1b", "python -c pass: hook armed (BUFFERFIX_AUTO=1) vs not installed")}
    for index, (row_id, name) in labels.items():
        if index < len(names):
            row = data["rows"][index]
            report.add(row_id, "1", name, baseline["median_ms"], row["median_ms"], row["ratio_to_baseline"],
                       reps=row["runs"], note="from benchmarks/startup.py (scratch venvs)")
    wrapt_row = next((r for r in data["rows"] if "import wrapt" in r["variant"]), None)
    bufferfix_row = next((r for r in data["rows"] if "import bufferfix" in r["variant"]), None)
    if wrapt_row and bufferfix_row:
        report.add("1c", "1", "import bufferfix vs import wrapt (startup.py's scratch venvs)", wrapt_row["median_ms"],
                   bufferfix_row["median_ms"], ratio(bufferfix_row["median_ms"], wrapt_row["median_ms"]),
                   reps=bufferfix_row["runs"], note="from benchmarks/startup.py")


def item2_import(report, sizes, tmp):
    env = clean_env()
    check = subprocess.run([sys.executable, "-c", "import bufferfix, sys; print('torch' in sys.modules, "
                            "bufferfix.is_enabled())"], env=env, cwd=tmp, capture_output=True, text=True)
    state = check.stdout.split()
    variants = {"wrapt": [sys.executable, "-c", "import wrapt"], "bufferfix": [sys.executable, "-c", "import bufferfix"]}
    samples = {name: [] for name in variants}

    def once(name):
        start = time.perf_counter()
        subprocess.run(variants[name], env=env, cwd=tmp, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        return time.perf_counter() - start

    for name in variants:  # warm OS caches and .pyc files
        for _ in range(2):
            once(name)
    for index in range(sizes["import_runs"]):
        order = ("wrapt", "bufferfix") if index % 2 == 0 else ("bufferfix", "wrapt")
        for name in order:
            samples[name].append(once(name))
    w, o = samples["bufferfix"], samples["wrapt"]
    report.add("2", "2", "python -c 'import bufferfix' vs 'import wrapt' (no torch), process wall time",
               round(median(o) * 1e3, 2), round(median(w) * 1e3, 2), ratio(median(w), median(o)), 1.10,
               reps=len(w), paired_ratio=_round(paired_ratio(w, o)),
               torch_imported=state[0] == "True" if state else None,
               bufferfix_enabled=state[1] == "True" if len(state) > 1 else None)


def item3_meta_build(report, sizes, on, off, aa, profile):
    size = sizes["meta_build"]
    spec = size["spec"]
    results, aa_runs = three_way(on, off, aa, "meta_build", {"spec": spec}, size["reps"])
    first = results["with"]["runs"][0]
    timing_row(report, "3", "3", "LlamaForCausalLM(%s) under torch.device('meta')" % spec["preset"],
               results["with"]["runs"], results["without"]["runs"], 1.02, aa_runs=aa_runs,
               modules=first["modules"], recipes_recorded=first["recipes_recorded"])
    if profile:
        report.sections["profile_meta_build"] = on.call("profile", spec=spec)["text"]


def item3_moe(report, sizes, threads, tmp, python):
    """The many-module case: a DeepSeek-V3-shaped MoE with one module per expert (transformers 4.x),
    in workers run by ``python`` (an interpreter whose transformers is 4.x)."""
    size = sizes["moe_build"]
    spec = size["spec"]
    workers = [Worker("moe-enabled", True, threads, tmp, python), Worker("moe-disabled", False, threads, tmp, python),
               Worker("moe-aa", False, threads, tmp, python)]
    try:
        for worker in workers:
            worker.wait_ready()
        info = workers[0].call("info")
        results, aa_runs = three_way(*workers, "meta_build", {"spec": spec}, size["reps"])
    finally:
        for worker in workers:
            worker.close()
    first = results["with"]["runs"][0]
    timing_row(report, "3m", "3", "DeepseekV3ForCausalLM(%s, %d experts per layer) under torch.device('meta'), "
               "transformers %s" % (spec["preset"], 256 if spec["preset"] == "deepseek-v3" else 8,
                                    info.get("transformers")),
               results["with"]["runs"], results["without"]["runs"], 1.02, aa_runs=aa_runs,
               modules=first["modules"], recipes_recorded=first["recipes_recorded"])


def _materialise_jobs(spec, flow, on, off, reps, slow_reps, approaches):
    jobs = []
    for approach in approaches:
        worker = on if approach == "bufferfix" else off
        jobs.append({"label": approach, "worker": worker, "task": "materialise",
                     "args": {"spec": spec, "flow": flow, "approach": approach},
                     "warmup_args": {"poison": True},  # correctness is judged on poisoned memory
                     "reps": slow_reps if approach == "init_weights" else reps})
    return jobs


def _correctness(result):
    warm = result["warmup"]
    return {"correct": warm["correct"], "problem": warm["problem"]}


def item4_load_and_alternatives(report, sizes, on, off, items, memory_rows):
    size = sizes["load"]
    spec = size["spec"]
    approaches = ["none", "bufferfix"] + (["init_weights"] if "alt" in items else [])
    born = interleave(_materialise_jobs(spec, "born_on_meta", on, off, size["reps"], size["slow_reps"], approaches))
    counters = born["bufferfix"]["runs"][0]["counters"]
    if "4" in items:
        internal = median([(r["counters"]["plan_s"] + r["counters"]["restore_s"]) for r in born["bufferfix"]["runs"]])
        timing_row(report, "4a", "4", "to_empty + load_state_dict, %s %s on CPU (built on meta)"
                   % (spec["preset"], spec["dtype"]), born["bufferfix"]["runs"], born["none"]["runs"], 1.02,
                   note="attributed_ratio = 1 + bufferfix's own time (plan + restore) / median without: "
                   "the part of the wall-time ratio that is bufferfix's rather than noise",
                   replays=counters["replays"], bufferfix_internal_ms=round(internal * 1e3, 3),
                   attributed_ratio=_round(1 + internal / median(seconds(born["none"]["runs"]))),
                   with_correct=born["bufferfix"]["warmup"]["correct"],
                   without_correct=born["none"]["warmup"]["correct"],
                   without_problem=born["none"]["warmup"]["problem"])
    roundtrip = None
    if "alt" in items or "7" in items:
        approaches = ["none", "bufferfix"] + (["accelerate_copy", "init_weights"] if "alt" in items else [])
        roundtrip = interleave(_materialise_jobs(spec, "roundtrip", on, off, max(2, size["reps"] // 2),
                                                 size["slow_reps"], approaches))
    if "alt" in items:
        none_born = born["none"]
        for approach in ("init_weights", "bufferfix"):
            timing_row(report, "alt-born-%s" % approach, "alt",
                       "born on meta -> to_empty -> load: %s vs nothing" % _APPROACH[approach],
                       born[approach]["runs"], none_born["runs"], None, **_correctness(born[approach]),
                       baseline_correct=none_born["warmup"]["correct"])
        report.sections["notes"] = [
            "accelerate's copy-and-reassign does not apply to a model born on meta: the copies are meta "
            "tensors ('Cannot copy out of meta tensor' when re-assigned); accelerate's FSDP2 path copies "
            "from a real model, the round-trip flow."]
        for approach in ("accelerate_copy", "init_weights", "bufferfix"):
            timing_row(report, "alt-roundtrip-%s" % approach, "alt",
                       "real -> .to('meta') -> to_empty -> load: %s vs nothing" % _APPROACH[approach],
                       roundtrip[approach]["runs"], roundtrip["none"]["runs"], None, **_correctness(roundtrip[approach]),
                       baseline_correct=roundtrip["none"]["warmup"]["correct"])
    memory_rows["llama born_on_meta"] = born
    if roundtrip is not None:
        memory_rows["llama roundtrip"] = roundtrip


_APPROACH = {"none": "nothing (broken)", "bufferfix": "bufferfix", "init_weights": "transformers init_weights()",
             "accelerate_copy": "accelerate's deep-copy + re-assign"}


def item7_perlayer(sizes, on, off, memory_rows):
    size = sizes["perlayer"]
    spec = size["spec"]
    memory_rows["perlayer born_on_meta"] = interleave(_materialise_jobs(
        spec, "born_on_meta", on, off, size["reps"], size["reps"], ["none", "bufferfix"]))
    memory_rows["perlayer roundtrip"] = interleave(_materialise_jobs(
        spec, "roundtrip", on, off, size["reps"], size["reps"], ["none", "bufferfix"]))


def item7_rows(report, memory_rows):
    for index, (label, result) in enumerate(memory_rows.items()):
        runs = result["bufferfix"]["runs"]
        base = result["none"]["runs"]
        np_total = runs[0]["np_bytes"]
        during = max(run["held_during_bytes"] for run in runs)
        after = max(run["held_after_bytes"] for run in runs)
        letter = "abcdefgh"[index]
        report.add("7%s-during" % letter, "7", "%s: bytes bufferfix holds during materialisation / np-buffer bytes"
                   % label, np_total, during, ratio(during, np_total) if np_total else 0.0, 1.0, unit="bytes",
                   reps=len(runs), snapshot_bytes=max(r["held_during_snapshot_bytes"] for r in runs),
                   replay_bytes=max(r["held_during_replay_bytes"] for r in runs),
                   replays=runs[0]["counters"]["replays"])
        report.add("7%s-after" % letter, "7", "%s: bytes bufferfix holds after materialisation / np-buffer bytes"
                   % label, np_total, after, ratio(after, np_total) if np_total else 0.0, 0.0, unit="bytes",
                   reps=len(runs), side_tables_after=runs[-1]["side_tables_after"])
        live_with = median([r["live_tensor_bytes_after"] for r in runs])
        live_without = median([r["live_tensor_bytes_after"] for r in base])
        report.add("7%s-live" % letter, "7", "%s: live CPU tensor bytes after materialisation, with / without "
                   "(extra: %d B)" % (label, live_with - live_without), live_without, live_with, ratio(live_with, live_without), 1.0, unit="bytes",
                   reps=len(runs), extra_bytes=live_with - live_without)
        peak_with = median([r["peak_rss_delta"] for r in runs])
        peak_without = median([r["peak_rss_delta"] for r in base])
        if peak_with is not None and peak_without is not None:
            report.add("7%s-peak-rss" % letter, "7", "%s: peak RSS growth during materialisation (MiB; allocator-dependent), with / without"
                       % label, round(peak_without / 2 ** 20, 2), round(peak_with / 2 ** 20, 2),
                       ratio(peak_with, peak_without) if peak_without > 0 else 1.0, unit="MiB", reps=len(runs),
                       difference_mib=round((peak_with - peak_without) / 2 ** 20, 2),
                       np_buffer_mib=round(np_total / 2 ** 20, 3))
        after_with = median([r["rss_after_delta"] for r in runs])
        after_without = median([r["rss_after_delta"] for r in base])
        report.add("7%s-rss-after" % letter, "7", "%s: RSS growth after materialisation (MiB; allocator-dependent), with / without"
                   % label, round(after_without / 2 ** 20, 2), round(after_with / 2 ** 20, 2),
                   ratio(after_with, after_without) if after_without > 0 else 1.0, unit="MiB", reps=len(runs),
                   difference_mib=round((after_with - after_without) / 2 ** 20, 2))


def item4_scaling(report, sizes, on, off):
    size = sizes["scaling"]
    table = []
    series = [("llama", dict(size["llama"], layers=layers)) for layers in size["layers"]]
    series += [("perlayer", dict(size["perlayer"], layers=layers)) for layers in size["layers"]]
    series += [("llama-hidden", dict(size["llama"], layers=size["hidden_layers"], hidden=hidden))
               for hidden in size["hidden"]]
    for family, spec in series:
        results = interleave([
            {"label": "with", "worker": on, "task": "to_empty", "args": {"spec": spec}, "reps": size["reps"]},
            {"label": "without", "worker": off, "task": "to_empty", "args": {"spec": spec}, "reps": size["reps"]},
        ])
        w, o = results["with"]["runs"], results["without"]["runs"]
        internal = [(r["counters"]["plan_s"] + r["counters"]["restore_s"]) for r in w]
        table.append({
            "series": family, "layers": spec["layers"], "hidden": spec.get("hidden"),
            "modules": w[0]["modules"], "modules_with_np_buffers": w[0]["modules_with_np_buffers"],
            "parameter_gib": round(w[0]["parameter_bytes"] / 2 ** 30, 3), "parameter_bytes": w[0]["parameter_bytes"],
            "np_buffer_bytes": w[0]["np_bytes"],
            "to_empty_without_ms": round(median(seconds(o)) * 1e3, 3),
            "to_empty_with_ms": round(median(seconds(w)) * 1e3, 3),
            "ratio": _round(ratio(median(seconds(w)), median(seconds(o)))),
            "bufferfix_plan_ms": round(median([r["counters"]["plan_s"] for r in w]) * 1e3, 3),
            "bufferfix_restore_ms": round(median([r["counters"]["restore_s"] for r in w]) * 1e3, 3),
            "bufferfix_internal_ms": round(median(internal) * 1e3, 3),
            "bufferfix_internal_min_ms": round(min(internal) * 1e3, 3),
            "replays": max(r["counters"]["replays"] for r in w),
            "meta_build_without_ms": round(median(seconds(o, "build_seconds")) * 1e3, 3),
            "meta_build_with_ms": round(median(seconds(w, "build_seconds")) * 1e3, 3),
            "held_after_bytes": max(r["held_after_bytes"] for r in w),
        })
    report.sections["scaling"] = table
    for family, row_id in (("llama", "4b"), ("perlayer", "4c")):
        rows = [row for row in table if row["series"] == family]
        first, last = rows[0], rows[-1]
        report.add(row_id + "-replays", "4", "%s: replays at %d layers / at %d layer(s) (identical recipes once)"
                   % (family, last["layers"], first["layers"]), first["replays"], last["replays"],
                   ratio(last["replays"], first["replays"]) if first["replays"] else None, 1.0, unit="replays",
                   compare="max")
        report.add(row_id + "-cost", "4", "%s: bufferfix's own ms (plan+restore; min of reps) at %d layers / at %d"
                   % (family, last["layers"], first["layers"]), first["bufferfix_internal_min_ms"],
                   last["bufferfix_internal_min_ms"],
                   ratio(last["bufferfix_internal_min_ms"], first["bufferfix_internal_min_ms"]),
                   unit="ms", note="modules x%.0f, modules with np buffers x%.0f, parameter bytes x%.0f" % (
                       last["modules"] / first["modules"],
                       last["modules_with_np_buffers"] / max(1, first["modules_with_np_buffers"]),
                       last["parameter_bytes"] / first["parameter_bytes"]))
        report.add(row_id + "-to-empty", "4", "%s: to_empty alone at %d layers, with vs without"
                   % (family, last["layers"]), last["to_empty_without_ms"], last["to_empty_with_ms"], last["ratio"],
                   unit="ms", reps=size["reps"])
    rows = [row for row in table if row["series"] == "llama-hidden"]
    first, last = rows[0], rows[-1]
    report.add("4d-bytes", "4", "llama, %d layers: bufferfix's own ms (min) at hidden %d / at hidden %d (bytes x%.0f)"
               % (size["hidden_layers"], last["hidden"], first["hidden"],
                  last["parameter_bytes"] / first["parameter_bytes"]),
               first["bufferfix_internal_min_ms"], last["bufferfix_internal_min_ms"],
               ratio(last["bufferfix_internal_min_ms"], first["bufferfix_internal_min_ms"]), unit="ms")
    for family in ("llama", "perlayer"):
        rows = [row for row in table if row["series"] == family]
        first, last = rows[0], rows[-1]
        report.sections.setdefault("scaling_slopes", {})[family] = {
            "us_per_module": round((last["bufferfix_internal_min_ms"] - first["bufferfix_internal_min_ms"]) * 1e3
                                   / (last["modules"] - first["modules"]), 2),
            "us_per_module_with_np_buffers": None if last["modules_with_np_buffers"] == first["modules_with_np_buffers"]
            else round((last["bufferfix_internal_min_ms"] - first["bufferfix_internal_min_ms"]) * 1e3
                       / (last["modules_with_np_buffers"] - first["modules_with_np_buffers"]), 2)}


def item5_from_pretrained(report, sizes, on, off, aa, tmp, key="pretrained", row_id="5"):
    size = sizes[key]
    spec = size["spec"]
    path = str(Path(tmp) / ("saved-model-" + key))
    saved = off.call("save_pretrained", spec=spec, path=path, constant=key != "pretrained")
    results, aa_runs = three_way(on, off, aa, "from_pretrained", {"spec": spec, "path": path}, size["reps"])
    timing_row(report, row_id, "5", "from_pretrained of a saved %s Llama, %s (%d modules)"
               % (spec["preset"], spec["dtype"], saved["modules"]),
               results["with"]["runs"], results["without"]["runs"], 1.02, aa_runs=aa_runs,
               replays=results["with"]["runs"][0]["counters"]["replays"],
               # bufferfix's own time inside the load (plan + restore, timed in the worker), per load:
               # the part of the difference that is not recording during the meta build
               plan_restore_ms=round(median([run["counters"]["plan_s"] + run["counters"]["restore_s"]
                                             for run in results["with"]["runs"]]) * 1e3, 3),
               with_correct=results["with"]["warmup"]["correct"],
               without_correct=results["without"]["warmup"]["correct"])
    return path, spec


def item6_forward(report, sizes, on, off, path, spec):
    size = sizes["forward"]
    args = {"spec": spec, "path": path, "tokens": size["tokens"]}
    results = interleave([
        {"label": "with", "worker": on, "task": "forward", "args": args, "reps": size["reps"]},
        {"label": "without", "worker": off, "task": "forward", "args": args, "reps": size["reps"]},
    ])
    digests = {label: results[label]["runs"][0]["logits_sha256"] for label in results}
    untouched = all(run["forward_path_untouched"] for run in results["with"]["runs"])
    row = timing_row(report, "6", "6", "forward pass, %s Llama, %d tokens, no grad" % (spec["preset"], size["tokens"]),
                     results["with"]["runs"], results["without"]["runs"], 1.00,
                     note="1.00 = adds nothing; met when no bufferfix code is on the forward path (no hooks, "
                     "torch's own __call__) and the ratio is within the measurement's resolution (+/- %.2f)"
                     % FORWARD_TOLERANCE,
                     logits_identical=digests["with"] == digests["without"], forward_path_untouched=untouched,
                     tolerance=FORWARD_TOLERANCE)
    row["meets_target"] = untouched and row["ratio"] is not None and row["ratio"] <= 1.0 + FORWARD_TOLERANCE


FORWARD_TOLERANCE = 0.02


# --------------------------------------------------------------------------- output


def _fmt(value, unit):
    if value is None:
        return "-"
    if unit == "bytes":
        return "%d B" % value if value < 10 * 2 ** 10 else "%.2f MiB" % (value / 2 ** 20)
    if unit == "replays":
        return "%d" % value
    if isinstance(value, float):
        return ("%.3f" if abs(value) < 100 else "%.1f") % value + ("" if unit in ("ms", "MiB") else " " + unit)
    return str(value)


def _correct_cell(row):
    """Buffers equal to a normal build's? "without/with" for with-vs-without rows, else the approach's."""
    yes_no = {True: "yes", False: "no", None: "?"}
    if "with_correct" in row:
        return "%s/%s" % (yes_no[row.get("without_correct")], yes_no[row.get("with_correct")])
    if "correct" in row:
        return yes_no[row["correct"]]
    if "logits_identical" in row:
        return "same logits" if row["logits_identical"] else "LOGITS DIFFER"
    return ""


def print_table(report, stream=sys.stdout):
    header = ("id", "measurement", "without", "with", "ratio", "min ratio", "A/A", "target", "ok", "correct")
    lines = []
    for row in report.rows:
        target = "-" if row["target"] is None else ("%g" % row["target"])
        ok = {True: "yes", False: "NO", None: ""}[row["meets_target"]]
        if row.get("error"):
            ok = "ERROR"
        unit = row["unit"] or ""
        name = row["name"] + ("" if unit in ("", "bytes", "replays") else " [%s]" % unit)
        correct = _correct_cell(row)
        aa = "-" if row.get("aa_ratio") is None else "%.3f / %.3f" % (row["aa_ratio"], row["aa_min_ratio"])
        lines.append((row["id"], name, _fmt(row["without"], unit), _fmt(row["with"], unit),
                      "-" if row["ratio"] is None else "%.3f" % row["ratio"],
                      "-" if row.get("min_ratio") is None else "%.3f" % row["min_ratio"], aa, target, ok, correct))
    widths = [max(len(str(line[i])) for line in [header] + lines) for i in range(len(header))]
    widths[1] = min(widths[1], 96)
    fmt = "  ".join("%%-%ds" % w if i < 2 else "%%%ds" % w for i, w in enumerate(widths))
    print(fmt % header, file=stream)
    print("  ".join("-" * w for w in widths), file=stream)
    for line in lines:
        name = line[1] if len(line[1]) <= widths[1] else line[1][:widths[1] - 1] + "~"
        print(fmt % ((line[0], name) + line[2:]), file=stream)
    if "scaling" in report.sections:
        print("\nscaling (to_empty alone on a meta-built model; bufferfix ms = plan + restore):", file=stream)
        columns = ("series", "layers", "hidden", "modules", "modules_with_np_buffers", "parameter_gib",
                   "to_empty_without_ms", "to_empty_with_ms", "bufferfix_internal_ms", "bufferfix_internal_min_ms",
                   "replays", "meta_build_without_ms", "meta_build_with_ms")
        short = ("series", "layers", "hidden", "modules", "np-mods", "param GiB", "without ms", "with ms",
                 "bf ms", "bf min ms", "replays", "build w/o", "build w/")
        table = [[("-" if row[c] is None else str(row[c])) for c in columns] for row in report.sections["scaling"]]
        widths = [max(len(x) for x in col) for col in zip(short, *table)]
        print("  ".join(h.rjust(w) for h, w in zip(short, widths)), file=stream)
        for row in table:
            print("  ".join(x.rjust(w) for x, w in zip(row, widths)), file=stream)


# --------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (smoke run, < 60 s)")
    parser.add_argument("--json", help="where to write results (default benchmarks/results.json, "
                        "or benchmarks/results-quick.json with --quick)")
    parser.add_argument("--only", help="comma-separated items to run (default all): " + ",".join(ITEMS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the workers (default 1)")
    parser.add_argument("--reps-scale", type=float, default=1.0, help="multiply repetition counts")
    parser.add_argument("--profile", action="store_true", help="cProfile bufferfix during the meta build")
    parser.add_argument("--no-startup", action="store_true", help="skip item 1 (benchmarks/startup.py)")
    parser.add_argument("--moe-python", default=str(ROOT / ".venv-t4" / "bin" / "python"),
                        help="interpreter with transformers 4.x for item 3m (one module per expert); "
                             "default .venv-t4/bin/python (the floors CI leg's set-up)")
    parser.add_argument("--calibrate", action="store_true",
                        help="A/A run: both workers without bufferfix, so every ratio shows only this machine's "
                             "noise (how far from 1.00 a ratio can land when nothing differs)")
    args = parser.parse_args(argv)

    sizes = json.loads(json.dumps(QUICK if args.quick else FULL))
    if args.reps_scale != 1.0:
        for value in sizes.values():
            if isinstance(value, dict):
                for key in ("reps", "slow_reps"):
                    if key in value:
                        value[key] = max(1, round(value[key] * args.reps_scale))
        for key in ("import_runs", "startup_runs"):
            sizes[key] = max(2, round(sizes[key] * args.reps_scale))
    items = set(args.only.split(",")) if args.only else set(ITEMS)
    if args.no_startup:
        items.discard("1")
    json_path = Path(args.json) if args.json else HERE / ("results-quick.json" if args.quick else "results.json")

    started = time.time()
    report = Report()
    meta = {"mode": ("calibration (A/A: no bufferfix in either worker), " if args.calibrate else "")
            + ("quick" if args.quick else "full"), "machine": machine(), "load_average_start": load_average(),
            "threads": args.threads, "items": sorted(items), "command": " ".join([Path(sys.executable).name] + sys.argv)}

    def step(name):
        print("[%6.1fs] %s" % (time.time() - started, name), file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="bufferfix-bench-") as tmp:
        if "1" in items:
            step("1: start-up hook (benchmarks/startup.py)")
            item1_startup(report, sizes, tmp)
        if "2" in items:
            step("2: import bufferfix vs import wrapt")
            try:
                item2_import(report, sizes, tmp)
            except Exception as error:  # noqa: BLE001
                report.error("2", "2", "import bufferfix vs import wrapt", str(error))
        needs_workers = items & {"3", "4", "5", "6", "7", "alt"}
        on = off = aa = None
        if needs_workers:
            step("starting workers")
            on = Worker("enabled", not args.calibrate, args.threads, tmp)
            off = Worker("disabled", False, args.threads, tmp)
            aa = Worker("disabled-aa", False, args.threads, tmp)
        try:
            if needs_workers:
                on.wait_ready()
                off.wait_ready()
                aa.wait_ready()
                meta["workers"] = {"enabled": on.call("info"), "disabled": off.call("info")}
                if meta["workers"]["enabled"]["enabled"] is args.calibrate or meta["workers"]["disabled"]["enabled"]:
                    raise WorkerError("worker set-up wrong: %r" % meta["workers"])
            memory_rows = {}

            def guarded(name, function, *fargs):
                step(name)
                try:
                    return function(*fargs)
                except Exception as error:  # noqa: BLE001 - keep going; the row says what failed
                    report.error(name.split(":")[0], name.split(":")[0], name, "%s: %s" % (type(error).__name__, error))
                    return None

            if "3" in items:
                guarded("3: meta build", item3_meta_build, report, sizes, on, off, aa, args.profile)
            if items & {"4", "alt", "7"}:
                guarded("4/alt: to_empty + load_state_dict, and today's alternatives", item4_load_and_alternatives,
                        report, sizes, on, off, items, memory_rows)
                on.call("release")
                off.call("release")
            if "7" in items:
                guarded("7: per-layer buffers (memory)", item7_perlayer, sizes, on, off, memory_rows)
                guarded("7: memory rows", item7_rows, report, memory_rows)
                on.call("release")
                off.call("release")
            if "4" in items:
                guarded("4: scaling 1..N layers", item4_scaling, report, sizes, on, off)
            saved = None
            if items & {"5", "6"}:
                saved = guarded("5: from_pretrained", item5_from_pretrained, report, sizes, on, off, aa, tmp)
            if "6" in items and saved:
                guarded("6: forward", item6_forward, report, sizes, on, off, *saved)
            if "5" in items:
                guarded("5b: from_pretrained (1B)", item5_from_pretrained, report, sizes, on, off, aa, tmp,
                        "pretrained_big", "5b")
                shutil.rmtree(Path(tmp) / "saved-model-pretrained_big", ignore_errors=True)
                guarded("5c: from_pretrained (3B)", item5_from_pretrained, report, sizes, on, off, aa, tmp,
                        "pretrained_larger", "5c")
                shutil.rmtree(Path(tmp) / "saved-model-pretrained_larger", ignore_errors=True)
        finally:
            for worker in (on, off, aa):
                if worker is not None:
                    worker.close()
        if "3m" in items:
            step("3m: MoE meta build (transformers 4.x workers: %s)" % args.moe_python)
            if Path(args.moe_python).exists():
                try:
                    item3_moe(report, sizes, args.threads, tmp, args.moe_python)
                except Exception as error:  # noqa: BLE001
                    report.error("3m", "3", "MoE meta build", "%s: %s" % (type(error).__name__, error))
            else:
                report.sections.setdefault("not_run", {})["3m"] = "no interpreter %s (--moe-python)" % args.moe_python
                step("3m: not run, no interpreter %s (--moe-python names one with transformers 4.x)"
                     % args.moe_python)

    meta["load_average_end"] = load_average()
    meta["wall_seconds"] = round(time.time() - started, 1)
    order = {item: index for index, item in enumerate(ITEMS)}
    report.rows.sort(key=lambda row: (order.get(row["item"], 99), row["id"]))
    result = dict(meta, rows=report.rows, **report.sections)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print_table(report)
    missed = [row["id"] for row in report.rows if row["meets_target"] is False and not row.get("error")]
    errors = [row["id"] for row in report.rows if row.get("error")]
    print("\n%s mode, %.0f s, load average %s -> %s; torch threads per worker: %d. Written to %s"
          % (meta["mode"], meta["wall_seconds"], meta["load_average_start"], meta["load_average_end"], args.threads,
             json_path))
    if missed:
        print("above target: " + ", ".join(missed))
    if errors:
        print("errors: " + ", ".join(errors))
        for row in report.rows:
            if row.get("error"):
                print("  %s: %s" % (row["id"], row["error"][:2000]), file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
