"""What the start-up hook costs: interpreter start-up with bufferfix installed vs not installed.

    python benchmarks/startup.py [--runs 60] [--json benchmarks/startup.json]

Makes two scratch venvs (in a temporary directory), identical except that one has bufferfix
installed with ``pip install --no-deps`` (so it has ``bufferfix-startup.pth``), and times
fresh interpreters, interleaving the variants run by run so that machine load affects them
alike.  Both venvs see the same copy of wrapt (a path .pth line to a symlink), so that
``import wrapt`` and ``import bufferfix`` can be compared without torch.

Measured (wall time of the whole process, median of ``--runs``):

- ``python -c pass`` without bufferfix: the baseline;
- ``python -c pass`` with the hook installed, ``BUFFERFIX_AUTO`` unset: the cost every
  Python process of the environment pays (the .pth line reads one variable);
- ``python -c pass`` with ``BUFFERFIX_AUTO=1``: the hook armed, torch never imported;
- ``import wrapt`` and ``import bufferfix`` (which enables it, importing wrapt), without torch;

and, in-process, what ``site`` spends on the .pth line itself with ``BUFFERFIX_AUTO`` unset
(compile + exec, ``timeit``): a figure that machine load barely disturbs.

Needs pip >= 22.3 (``pip --python``) in the environment running it, and wrapt installed there.
This is a benchmark, not a test: it asserts nothing.
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

ROOT = Path(__file__).resolve().parent.parent


def _clean_env(**overrides):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BUFFERFIX_", "PYTHON")) and k != "VIRTUAL_ENV"}
    env.update(overrides)
    return env


def _make_venv(path, deps_dir, install_from=None):
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = str(path / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "zzz-benchmark-dependencies.pth").write_text(str(deps_dir) + "\n")
    if install_from is not None:
        subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
                        "--disable-pip-version-check", str(install_from)], check=True, env=_clean_env())
    return python


def _time_once(argv, env, cwd):
    start = time.perf_counter()
    subprocess.run(argv, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _pth_line_cost(python, number=20000):
    """Microseconds that site.py spends on the installed .pth line (compile + exec) with BUFFERFIX_AUTO unset."""
    code = (
        "import site, sysconfig, os, timeit\n"
        "line = open(os.path.join(sysconfig.get_path('purelib'), 'bufferfix-startup.pth')).read()\n"
        "print(min(timeit.repeat(lambda: exec(line, {}), number=%d, repeat=5)) / %d * 1e6)\n" % (number, number))
    out = subprocess.run([python, "-c", code], env=_clean_env(), check=True, capture_output=True, text=True).stdout
    return float(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=60, help="runs per variant (default 60)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "startup.json"), help="where to write results")
    args = parser.parse_args(argv)

    import wrapt  # noqa: F401  (must be installed here: both venvs borrow it)

    wrapt_dir = Path(sys.modules["wrapt"].__file__).resolve().parent
    with tempfile.TemporaryDirectory(prefix="bufferfix-startup-bench-") as tmp:
        tmp = Path(tmp)
        deps = tmp / "deps"
        deps.mkdir()
        (deps / "wrapt").symlink_to(wrapt_dir)
        source = tmp / "source"
        shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
            ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "tests", "benchmarks"))
        print("making venvs in %s ..." % tmp, file=sys.stderr)
        without = _make_venv(tmp / "without", deps)
        hooked = _make_venv(tmp / "with", deps, install_from=source)
        pth_line_us = _pth_line_cost(hooked)

        variants = [  # name, argv, extra environment
            ("python -c pass, bufferfix not installed", [without, "-c", "pass"], {}),
            ("python -c pass, hook installed, BUFFERFIX_AUTO unset", [hooked, "-c", "pass"], {}),
            ("python -c pass, hook installed, BUFFERFIX_AUTO=1", [hooked, "-c", "pass"], {"BUFFERFIX_AUTO": "1"}),
            ("python -c 'import wrapt'", [hooked, "-c", "import wrapt"], {}),
            ("python -c 'import bufferfix' (no torch)", [hooked, "-c", "import bufferfix"], {}),
        ]
        envs = [_clean_env(**extra) for _, _, extra in variants]
        for (_, command, _), env in zip(variants, envs):  # warm the OS caches and .pyc files
            for _ in range(3):
                _time_once(command, env, str(tmp))
        samples = [[] for _ in variants]
        for _ in range(args.runs):
            for index, ((_, command, _), env) in enumerate(zip(variants, envs)):
                samples[index].append(_time_once(command, env, str(tmp)))

    baseline = statistics.median(samples[0])
    rows = []
    for (name, _, _), times in zip(variants, samples):
        median = statistics.median(times)
        rows.append({"variant": name, "median_ms": round(median * 1e3, 2), "min_ms": round(min(times) * 1e3, 2),
                     "stdev_ms": round(statistics.stdev(times) * 1e3, 2) if len(times) > 1 else 0.0,
                     "ratio_to_baseline": round(median / baseline, 3), "runs": len(times)})
    width = max(len(row["variant"]) for row in rows)
    print("%-*s  %9s  %8s  %8s  %6s" % (width, "variant", "median ms", "min ms", "stdev", "ratio"))
    for row in rows:
        print("%-*s  %9.1f  %8.1f  %8.1f  %6.3f" % (width, row["variant"], row["median_ms"], row["min_ms"],
                                                    row["stdev_ms"], row["ratio_to_baseline"]))
    print("site.py's cost of the bufferfix-startup.pth line with BUFFERFIX_AUTO unset: %.1f us (compile + exec, "
          "best of 5x20000 in-process)" % pth_line_us)
    wrapt_row, bufferfix_row = rows[3], rows[4]
    result = {
        "python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "runs": args.runs, "rows": rows,
        "hook_unset_over_baseline": rows[1]["ratio_to_baseline"],
        "hook_unset_min_over_baseline_min": round(rows[1]["min_ms"] / rows[0]["min_ms"], 3),
        "pth_line_unset_us": round(pth_line_us, 2),
        "hook_armed_over_baseline": rows[2]["ratio_to_baseline"],
        "import_bufferfix_minus_import_wrapt_ms": round(bufferfix_row["median_ms"] - wrapt_row["median_ms"], 2),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print("hook installed but unset: x%.3f of the baseline start-up; armed: x%.3f; "
          "import bufferfix - import wrapt: %+.1f ms (written to %s)"
          % (result["hook_unset_over_baseline"], result["hook_armed_over_baseline"],
             result["import_bufferfix_minus_import_wrapt_ms"], args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
