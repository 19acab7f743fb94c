"""The meta-build ratio over many fresh worker processes (a diagnostic, not part of run.py).

    python benchmarks/respawn.py [--sets 12] [--reps 9] [--preset llama70b]

``run.py`` keeps one long-lived worker per arm, so every round of a row shares the same two
processes.  On this VM a process keeps its own speed: two identical workers without bufferfix
(the A/A pair) differ by anything from 0.5% to 8.5% over a whole run, the same in every round, so
one run's ratio carries that process bias however many rounds it has.  Here ``--sets`` times, three
fresh workers are started (bufferfix on, off, and a second off for the A/A), the row-3 meta build
is interleaved ``--reps`` times between them, and the workers are closed; each set gives a ratio
of medians, and the spread of those ratios is the process bias.  The median over the sets is the
estimate that does not rest on one pair of processes.
"""
import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import Worker, median, seconds, three_way


def one_set(spec, reps, log_dir):
    workers = {"with": Worker("with", True, 1, log_dir), "without": Worker("without", False, 1, log_dir),
               "aa": Worker("aa", False, 1, log_dir)}
    try:
        for worker in workers.values():
            worker.wait_ready()
        results, _ = three_way(workers["with"], workers["without"], workers["aa"], "meta_build", {"spec": spec}, reps)
    finally:
        for worker in workers.values():
            worker.close()
    times = {label: median(seconds(results[label]["runs"])) for label in workers}
    return times["with"] / times["without"], times["aa"] / times["without"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=int, default=12, help="fresh worker sets (default 12)")
    parser.add_argument("--reps", type=int, default=9, help="interleaved rounds per set (default 9)")
    parser.add_argument("--preset", default="llama70b", help="bench_models Llama preset (default llama70b)")
    args = parser.parse_args(argv)
    spec = {"family": "llama", "preset": args.preset, "dtype": "bfloat16"}
    ratios, aa = [], []
    with tempfile.TemporaryDirectory() as log_dir:
        for index in range(args.sets):
            with_ratio, aa_ratio = one_set(spec, args.reps, log_dir)
            ratios.append(with_ratio)
            aa.append(aa_ratio)
            print("set %2d: with / without %.3f   A/A %.3f" % (index + 1, with_ratio, aa_ratio), flush=True)
    print("LlamaForCausalLM(%s) under torch.device('meta'), %d sets x %d rounds:" % (args.preset, args.sets, args.reps))
    print("  with / without: median over sets %.3f (range %.3f-%.3f)" % (statistics.median(ratios), min(ratios),
                                                                       max(ratios)))
    print("  A/A:            median over sets %.3f (range %.3f-%.3f)" % (statistics.median(aa), min(aa), max(aa)))


if __name__ == "__main__":
    main()
