"""The benchmark suite runs end to end (``benchmarks/run.py --quick``) and reports every row.

A smoke test only: it checks the JSON's shape (every expected row present, each with a numeric
ratio, no errors), never a timing.
"""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "benchmarks" / "run.py"

# Rows run.py itself produces (item 1's come from benchmarks/startup.py, checked when it exists).
EXPECTED = {
    "2", "3", "4a",
    "4b-replays", "4b-cost", "4b-to-empty", "4c-replays", "4c-cost", "4c-to-empty", "4d-bytes",
    "5", "5b", "5c", "6",
    "alt-born-init_weights", "alt-born-bufferfix",
    "alt-roundtrip-accelerate_copy", "alt-roundtrip-init_weights", "alt-roundtrip-bufferfix",
} | {"7%s-%s" % (letter, kind) for letter in "abcd" for kind in ("during", "after", "live", "peak-rss", "rss-after")}
STARTUP = {"1a", "1b", "1c"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    done = subprocess.run([sys.executable, str(RUNNER), "--quick", "--json", str(out)], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, "run.py --quick failed:\n%s\n%s" % (done.stdout[-4000:], done.stderr[-4000:])
    return json.loads(out.read_text()), done.stdout


def test_every_row_is_present(results):
    data, _ = results
    ids = {row["id"] for row in data["rows"]}
    expected = EXPECTED | (STARTUP if (ROOT / "benchmarks" / "startup.py").exists() else set())
    assert expected <= ids, "missing rows: %s" % sorted(expected - ids)


def test_every_row_has_a_numeric_ratio_and_no_error(results):
    data, _ = results
    for row in data["rows"]:
        assert not row.get("error"), "%s: %s" % (row["id"], row["error"])
        assert isinstance(row["ratio"], (int, float)) and math.isfinite(row["ratio"]), row


def test_timing_rows_give_both_ratios_and_an_a_a_row(results):
    """Issue 16's method: ratio of the medians, of the fastest runs, and the same two for a second
    worker without bufferfix (A/A), in the same interleaved run."""
    data, _ = results
    rows = {row["id"]: row for row in data["rows"]}
    for row_id in ("3", "5", "5b", "5c") + (("3m",) if "3m" in rows else ()):
        for key in ("ratio", "min_ratio", "aa_ratio", "aa_min_ratio"):
            assert isinstance(rows[row_id][key], float) and math.isfinite(rows[row_id][key]), (row_id, key)
        assert len(rows[row_id]["samples_aa_ms"]) == len(rows[row_id]["samples_without_ms"])


def test_correctness_is_reported(results):
    """Not timings: what each approach leaves in the buffers is deterministic, so it is checked."""
    data, _ = results
    rows = {row["id"]: row for row in data["rows"]}
    assert rows["4a"]["with_correct"] is True
    assert rows["4a"]["without_correct"] is False  # to_empty without bufferfix leaves garbage
    assert rows["alt-roundtrip-bufferfix"]["correct"] is True
    assert rows["alt-roundtrip-accelerate_copy"]["correct"] is True
    assert rows["6"]["logits_identical"] is True
    assert rows["6"]["forward_path_untouched"] is True
    assert rows["4b-replays"]["with"] == 1 and rows["4c-replays"]["with"] == 2  # one per distinct recipe
    for row in data["rows"]:
        if re.fullmatch(r"7[a-z]-after", row["id"]):
            assert row["with"] == 0, row  # snapshots and replay caches freed
        if re.fullmatch(r"7[a-z]-during", row["id"]):
            # a snapshot or a replayed module holds the values until they are copied in
            assert 0 < row["with"] <= row["without"], row


def test_table_is_printed(results):
    _, stdout = results
    assert "ratio" in stdout and "target" in stdout
    assert "scaling" in stdout
