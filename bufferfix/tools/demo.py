"""``bufferfix demo``: the public report (transformers issue 36577), offline, in under a minute on 2 CPU cores.

A tiny Qwen2-architecture causal LM (config: ``bufferfix/tools/data/demo_qwen2.json``) is trained on
an embedded text until its evaluation loss is about 0.15, saved with ``save_pretrained``, then
reloaded through ``from_pretrained`` and through each meta-device flow of
:data:`bufferfix.flows.FLOWS`, each in fresh interpreters: without bufferfix (``BUFFERFIX_DISABLE=1``,
genuinely unpatched: bufferfix never touches torch there) twice, with uninitialised memory as the
allocator hands it back (what a user sees: plausible, wrong losses) and poisoned (NaN / max-int:
a lost buffer always shows), and with bufferfix on (memory poisoned, so nothing is right by luck).
Each reloaded model is scored on the same evaluation batch as the trained model, and its logits
are compared with the trained model's: the trained model is the reference, every correct flow
gives exactly its loss (largest logit difference 0).

Every interpreter runs torch single-threaded: on a small model this is faster than several
threads (and much faster on a busy machine), and it makes every number reproducible.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, TypedDict

from . import unpatched
from .check import FLOW_NAMES, FROM_PRETRAINED
from .errors import require

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo_qwen2.json")

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be on "
    "his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding "
    "families, that he is considered the rightful property of some one or other of their daughters. "
)
SEQUENCE = 96  # characters (bytes) per training / evaluation window
BATCH = 8
LEARNING_RATE = 3e-3
EVALUATE_EVERY = 5  # steps; training stops at the first evaluation at or below the target
REPORTED = {  # transformers issue 36577 (its own Qwen2 model and data), loss after reloading: for comparison only
    FROM_PRETRAINED: 0.151,
    FLOW_NAMES["init_empty_weights"]: 4.54,
    FLOW_NAMES["torch.device('meta')"]: 3.57,
}
REFERENCE_FILE = "bufferfix-demo-reference.pt"


class Scored(TypedDict):
    """One flow's reload, scored (a crash is a result too)."""

    loss: float | None
    max_logit_difference: float | None
    error: str | None


# --------------------------------------------------------------------------- model and data

def load_config() -> tuple[PretrainedConfig, type[PreTrainedModel]]:
    """The demo's ``transformers`` config and model class (from the JSON shipped in the package)."""
    import transformers

    with open(CONFIG_FILE) as handle:
        spec = json.load(handle)
    config = transformers.AutoConfig.for_model(**spec)
    return config, getattr(transformers, spec["architectures"][0])


def _batches(torch: ModuleType, count: int, generator: torch.Generator) -> torch.Tensor:
    data = torch.tensor(list(TEXT.encode()) * 4)
    starts = torch.randint(0, len(TEXT), (count,), generator=generator)
    return torch.stack([data[s: s + SEQUENCE] for s in starts.tolist()])


def evaluation_batch(torch: ModuleType) -> torch.Tensor:
    data = torch.tensor(list(TEXT.encode()) * 2)
    return torch.stack([data[s: s + SEQUENCE] for s in range(0, len(TEXT), 37)])


def score(model: torch.nn.Module, batch: torch.Tensor) -> tuple[float, torch.Tensor]:
    """``(loss, logits)`` of ``model`` on ``batch`` (next-byte prediction)."""
    import torch

    with torch.no_grad():
        output = model.eval()(input_ids=batch, labels=batch)
    return output.loss.item(), output.logits


def train(directory: str, target_loss: float = 0.15, max_steps: int = 1000,
          log: Callable[[str], None] = print) -> float:
    """Train until the evaluation loss is ``<= target_loss``; save the model (``save_pretrained``)
    and the trained model's evaluation loss and logits into ``directory``.  Returns the loss."""
    import torch
    from transformers.utils import logging as transformers_logging

    torch.set_num_threads(1)
    config, model_class = load_config()
    torch.manual_seed(0)
    model = model_class(config)
    optimiser = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(0)
    evaluation = evaluation_batch(torch)
    start, step, last_shown = time.time(), 0, 0.0
    evaluation_loss = score(model, evaluation)[0]
    log("  training: step %4d  eval loss %.3f" % (step, evaluation_loss))
    while evaluation_loss > target_loss and step < max_steps:
        model.train()
        for _ in range(EVALUATE_EVERY):
            step += 1
            batch = _batches(torch, BATCH, generator)
            loss = model(input_ids=batch, labels=batch).loss
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        evaluation_loss = score(model, evaluation)[0]
        if time.time() - last_shown >= 1.0 or evaluation_loss <= target_loss:
            last_shown = time.time()
            log("  training: step %4d  eval loss %.3f  (%.1fs)" % (step, evaluation_loss, last_shown - start))
    transformers_logging.disable_progress_bar()
    model.save_pretrained(directory)
    loss, logits = score(model, evaluation)
    torch.save({"loss": loss, "logits": logits, "steps": step}, os.path.join(directory, REFERENCE_FILE))
    return loss


# --------------------------------------------------------------------------- one column (child)

ALLOCATED, POISONED = "as allocated", "poisoned"  # uninitialised memory as the allocator hands it back / NaN


def evaluate(directory: str, memory: str = POISONED) -> dict[str, Scored]:
    """In this interpreter: reload the saved model through every flow.  Returns
    ``{flow: {"loss", "max_logit_difference", "error"}}`` (a crash is a result too)."""
    import torch
    from safetensors.torch import load_file
    from transformers.utils import logging as transformers_logging

    from bufferfix import flows

    torch.set_num_threads(1)
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    config, model_class = load_config()
    state_dict = load_file(os.path.join(directory, "model.safetensors"))
    reference = torch.load(os.path.join(directory, REFERENCE_FILE))
    batch = evaluation_batch(torch)

    def build() -> PreTrainedModel:
        return model_class(config)

    loaders: dict[str, Callable[[], torch.nn.Module]] = {
        FROM_PRETRAINED: lambda: model_class.from_pretrained(directory, dtype=torch.float32)}
    loaders.update({FLOW_NAMES[key]: functools.partial(flow, build, state_dict) for key, flow in flows.FLOWS.items()})
    results: dict[str, Scored] = {}
    poison = flows.uninitialised_memory_is_poisoned() if memory == POISONED else contextlib.nullcontext()
    with poison:
        for name, load in loaders.items():
            try:
                loss, logits = score(load(), batch)
                difference = (logits - reference["logits"]).abs().max().item()
                results[name] = {"loss": loss, "max_logit_difference": difference, "error": None}
            except Exception as error:  # noqa: BLE001 - a crash is a result too
                message = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
                results[name] = {"loss": None, "max_logit_difference": None,
                                 "error": "%s: %s" % (type(error).__name__, message)}
    return results


def _evaluate_child(directory: str, memories: list[str]) -> None:
    unpatched.answer({"results": {memory: evaluate(directory, memory) for memory in memories}})


def run_columns(directory: str) -> tuple[dict[str, Scored], dict[str, Scored], dict[str, Scored]]:
    """``(without as allocated, without poisoned, with bufferfix)``: the unpatched interpreter measures
    both kinds of memory (as allocated first, as in a user's fresh process), a bufferfix one runs
    beside it."""
    children = [(unpatched.Child(__name__, ["--evaluate", directory, "--memory", memories], bufferfix_on), memories)
                for bufferfix_on, memories in ((False, ALLOCATED + "," + POISONED), (True, POISONED))]
    columns: dict[bool, list[dict[str, Scored]]] = {}
    for child, memories in children:
        try:
            results = child.result()["results"]
        except unpatched.ChildFailed as error:
            raise RuntimeError("%s\n%s" % (error, error.stderr[-3000:])) from None
        columns[child.bufferfix_on] = [results[memory] for memory in memories.split(",")]
    return columns[False][0], columns[False][1], columns[True][0]


# --------------------------------------------------------------------------- presentation

def _number(value: float) -> str:
    return "nan" if value != value else "%.3f" % value if abs(value) >= 1e-3 or value == 0 else "%.1e" % value


def _loss_cell(result: Scored, crashes: dict[str, int]) -> str:
    if result["error"] is not None:
        return "crash%d" % crashes.setdefault(result["error"], len(crashes) + 1)
    assert result["loss"] is not None  # no error: it was scored
    return _number(result["loss"])


def _difference_cell(result: Scored) -> str:
    if result["error"] is not None:
        return "-"
    difference = result["max_logit_difference"]
    assert difference is not None  # no error: it was scored
    return "0" if difference == 0 else _number(difference)


def format_table(allocated: Mapping[str, Scored], poisoned: Mapping[str, Scored],
                 with_fix: Mapping[str, Scored]) -> str:
    """One row per flow: its loss without bufferfix (memory as allocated, then poisoned) and with
    bufferfix, with its largest logit difference from the trained model.  At most 100 columns for
    the demo's flows."""
    crashes: dict[str, int] = {}  # error -> its number (the same error once)
    width = max(len(name) for name in with_fix)
    lines = ["%-*s  %17s  %16s" % (width, "", "without bufferfix", "with bufferfix"),
             "%-*s  %8s %8s  %8s %7s" % (width, "flow", "garbage", "poisoned", "loss", "Δlogit")]
    for name in with_fix:
        lines.append("%-*s  %8s %8s  %8s %7s" % (width, name, _loss_cell(allocated[name], crashes),
                                                  _loss_cell(poisoned[name], crashes),
                                                  _loss_cell(with_fix[name], crashes), _difference_cell(with_fix[name])))
    for error, number in crashes.items():
        line = "crash%d: %s" % (number, error)
        lines.append(line if len(line) <= 100 else line[:97] + "...")
    return "\n".join(lines)


def reported_note() -> str:
    """What transformers issue 36577 saw, for comparison (a different model and data: not the reference)."""
    return ("transformers issue 36577, on its own model and data, saw loss %.3f through from_pretrained\n"
            "(right) and %s through init_empty_weights() / torch.device('meta') (wrong, like 'garbage')."
            % (REPORTED[FROM_PRETRAINED], " / ".join("%.3g" % REPORTED[n] for n in REPORTED if n != FROM_PRETRAINED)))


def wrong_with_bufferfix(with_fix: Mapping[str, Scored]) -> list[str]:
    """Flows whose logits are not exactly the trained model's with bufferfix on."""
    return [name for name, result in with_fix.items()
            if result["error"] is not None or result["max_logit_difference"] != 0.0]


def plot(path: str, without: Mapping[str, Scored], with_fix: Mapping[str, Scored], trained_loss: float) -> None:
    """A bar chart of the loss per flow, without bufferfix (memory as allocated) and with it (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    names = list(without)
    finite = [r["loss"] for column in (without, with_fix) for r in column.values()
              if r["loss"] is not None and math.isfinite(r["loss"])]
    ceiling = max(finite + [trained_loss, max(REPORTED.values())]) * 1.15
    figure, axes = pyplot.subplots(figsize=(10, 5.4))
    for offset, (label, column, colour) in enumerate([("without bufferfix (memory as allocated)", without, "#d62728"),
                                                      ("with bufferfix", with_fix, "#2ca02c")]):
        for index, name in enumerate(names):
            result, x = column[name], index + (offset - 0.5) * 0.38
            if result["loss"] is not None and math.isfinite(result["loss"]):
                axes.bar(x, result["loss"], 0.38, color=colour, label=label if index == 0 else None)
                axes.text(x, result["loss"], "%.3g" % result["loss"], ha="center", va="bottom", fontsize=8)
            else:  # nan or a crash: a hatched bar up to the top, labelled
                axes.bar(x, ceiling, 0.38, color="none", edgecolor=colour, hatch="//",
                         label=label if index == 0 else None)
                axes.text(x, ceiling / 2, "crash" if result["error"] else "NaN", ha="center", va="center",
                          rotation=90, fontsize=9, color=colour)
    for index, name in enumerate(names):
        if name in REPORTED:
            axes.plot(index - 0.19, REPORTED[name], marker="D", color="black", markersize=5, linestyle="none",
                      label="reported in transformers issue 36577" if name == FROM_PRETRAINED else None)
    axes.axhline(trained_loss, color="grey", linestyle="--", linewidth=1, label="trained model (%.3f)" % trained_loss)
    axes.set_xticks(range(len(names)))
    axes.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    axes.set_ylabel("evaluation loss after reloading")
    axes.set_ylim(0, ceiling * 1.05)
    axes.set_title("Tiny Qwen2 reloaded through meta-device flows (transformers issue 36577)")
    axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=4, frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


# --------------------------------------------------------------------------- command line

HELP = "reproduce transformers issue 36577 offline: train a tiny LM, reload it through every flow"
DESCRIPTION = ("Reproduce transformers issue 36577 offline: train a tiny Qwen2 LM on an embedded text (CPU), save "
               "it, reload it through from_pretrained and each meta-device flow, without and with bufferfix (in "
               "fresh interpreters), and print each flow's loss and, with bufferfix, the largest logit difference "
               "from the trained model, which is the reference. Needs transformers and accelerate.")
EPILOG = ("Without bufferfix each flow runs twice: with uninitialised memory as the allocator hands it back, as in "
          "the report (the 'garbage' column: plausible but wrong losses that vary from run to run, and may even "
          "look right by luck), and with it poisoned, NaN / max-int (torch's deterministic mode), so that a lost "
          "buffer always shows as a nan loss or a crash. With bufferfix memory is poisoned too: nothing can be "
          "right by luck. Exit status: 0 every flow is exact with bufferfix, 1 one is not, 2 a missing package.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target-loss", type=float, default=0.15, metavar="X",
                        help="stop training at the first evaluation loss <= X (default: %(default)s, the report's)")
    parser.add_argument("--max-steps", type=int, default=1000, metavar="N",
                        help="stop training after N steps at the latest (default: %(default)s)")
    parser.add_argument("--plot", metavar="FILE.png", help="also save a bar chart of the losses (needs matplotlib)")
    parser.add_argument("--json", metavar="FILE",
                        help="also write every number as JSON to FILE ('-': stdout, and the rest goes to stderr)")
    parser.add_argument("--save", metavar="DIR", help="keep the trained model in DIR (default: a temporary directory)")
    parser.add_argument("--evaluate", metavar="DIR", help=argparse.SUPPRESS)  # in a child: reload DIR...
    parser.add_argument("--memory", default=POISONED, help=argparse.SUPPRESS)  # ...with these kinds of memory


def run(arguments: argparse.Namespace) -> int:
    """The demo; returns the exit status (raises :class:`~bufferfix.tools.errors.UsageError`)."""
    require("transformers", "accelerate", "safetensors", what="the demo")
    if arguments.evaluate:
        _evaluate_child(arguments.evaluate, arguments.memory.split(","))
        return 0
    if arguments.plot:
        require("matplotlib", what="--plot", install="pip install matplotlib")
    quiet = arguments.json == "-"
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if quiet else (lambda *a: print(*a, flush=True))
    started = time.time()
    with (contextlib.nullcontext(arguments.save) if arguments.save else tempfile.TemporaryDirectory()) as directory:
        log("Training a tiny Qwen2 LM on an embedded text (CPU, 1 thread) until its eval loss is <= %g..."
            % arguments.target_loss)
        trained_loss = train(directory, arguments.target_loss, arguments.max_steps, log)
        log("Trained to eval loss %.3f; saved with save_pretrained. Reloading it through each flow,\n"
            "without and with bufferfix, in fresh interpreters..." % trained_loss)
        allocated, poisoned, with_fix = run_columns(directory)
    wrong = wrong_with_bufferfix(with_fix)
    verdict = ("With bufferfix every flow gives exactly the trained model's logits (Δlogit 0)." if not wrong
               else "Still wrong with bufferfix: %s" % ", ".join(wrong))
    log("\nThe trained model's loss is %.3f: a correct reload gives exactly that, with its logits (Δlogit 0).\n"
        % trained_loss + format_table(allocated, poisoned, with_fix)
        + "\n\ngarbage: uninitialised memory as the allocator hands it back (varies from run to run);"
          "\npoisoned: uninitialised memory filled with NaN / max-int, so that a lost buffer always shows."
          "\nΔlogit: largest |logit difference| from the trained model.\n"
        + reported_note() + "\n%s  (%.0fs)" % (verdict, time.time() - started))
    if arguments.json:
        document = {"trained_loss": trained_loss, "target_loss": arguments.target_loss,
                    "reported_in_issue_36577": REPORTED, "without_bufferfix_memory_as_allocated": allocated,
                    "without_bufferfix": poisoned, "with_bufferfix": with_fix, "wrong_with_bufferfix": wrong}
        if arguments.json == "-":
            print(json.dumps(document))
        else:
            with open(arguments.json, "w") as handle:
                json.dump(document, handle, indent=1)
    if arguments.plot:
        plot(arguments.plot, allocated, with_fix, trained_loss)
        log("Plot saved to %s" % arguments.plot)
    return 1 if wrong else 0


if __name__ == "__main__":  # python -m bufferfix.tools.demo: the demo's own child interpreters
    from .cli import run_tool

    sys.exit(run_tool("demo"))
