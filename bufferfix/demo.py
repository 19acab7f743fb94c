"""``python -m bufferfix demo``: the public report (transformers issue 36577), offline, in seconds.

A tiny Qwen2-architecture causal LM is trained on an embedded text until its loss is low,
saved with ``save_pretrained``, then reloaded through each meta-device flow.  Every flow
is evaluated twice, each time in a fresh interpreter: once with ``BUFFERFIX_DISABLE=1``
(genuinely unpatched: bufferfix never touches torch there) and once with bufferfix on.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be on "
    "his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding "
    "families, that he is considered the rightful property of some one or other of their daughters. "
)
CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              tie_word_embeddings=False)
SEQUENCE = 96


def _batches(torch, count, generator):
    data = torch.tensor(list(TEXT.encode()) * 4)
    starts = torch.randint(0, len(TEXT), (count,), generator=generator)
    return torch.stack([data[s: s + SEQUENCE] for s in starts.tolist()])


def _evaluation_batch(torch):
    data = torch.tensor(list(TEXT.encode()) * 2)
    return torch.stack([data[s: s + SEQUENCE] for s in range(0, len(TEXT), 37)])


def train(directory, target_loss=0.15, max_steps=1500):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**CONFIG))
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    evaluation = _evaluation_batch(torch)
    start = time.time()
    for step in range(1, max_steps + 1):
        batch = _batches(torch, 16, generator)
        loss = model(input_ids=batch, labels=batch).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 25 == 0:
            with torch.no_grad():
                evaluation_loss = model(input_ids=evaluation, labels=evaluation).loss.item()
            if step % 50 == 0 or evaluation_loss <= target_loss:
                print("  training: step %4d  loss %.3f  (%.0fs)" % (step, evaluation_loss, time.time() - start),
                      flush=True)
            if evaluation_loss <= target_loss:
                break
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    model.save_pretrained(directory)
    return evaluation_loss


def evaluate(directory):
    """In this interpreter: reload through each flow; print one JSON line of results."""
    import torch
    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from bufferfix import flows

    config = Qwen2Config.from_pretrained(directory)
    state_dict = load_file(os.path.join(directory, "model.safetensors"))
    batch = _evaluation_batch(torch)

    def build():
        return Qwen2ForCausalLM(config)

    def score(model):
        with torch.no_grad():
            output = model(input_ids=batch, labels=batch)
        return output.loss.item(), output.logits

    results = {}
    with flows.uninitialised_memory_is_poisoned():
        reference_loss, reference_logits = score(Qwen2ForCausalLM.from_pretrained(directory))
        results["from_pretrained"] = (reference_loss, 0.0)
        for name, flow in flows.FLOWS.items():
            try:
                loss, logits = score(flow(build, state_dict))
                results[name] = (loss, (logits - reference_logits).abs().max().item())
            except Exception as error:  # noqa: BLE001 - a crash is a result too
                results[name] = ("%s: %s" % (type(error).__name__, str(error)[:60]), None)
    print(json.dumps(results))


def _run_flows(directory, bufferfix_on):
    environment = dict(os.environ, BUFFERFIX_DISABLE="0" if bufferfix_on else "1")
    output = subprocess.run([sys.executable, "-m", "bufferfix.demo", "--evaluate", directory],
                            env=environment, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _cell(result):
    loss, difference = result
    if isinstance(loss, str):
        return "%-26s" % ("crash: " + loss)[:26]
    return "loss %7.3f  Δlogit %7.3g" % (loss, difference) if difference == difference else "loss %7.3f  Δlogit    nan" % loss


def format_table(without, with_fix):
    lines = ["%-38s | %-26s | %-26s" % ("flow", "without bufferfix", "with bufferfix"), "-" * 96]
    for name in without:
        lines.append("%-38s | %-26s | %-26s" % (name, _cell(without[name]), _cell(with_fix[name])))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bufferfix demo", description=__doc__.splitlines()[0])
    parser.add_argument("--evaluate", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--target-loss", type=float, default=0.15)
    arguments = parser.parse_args(argv)
    if arguments.evaluate:
        evaluate(arguments.evaluate)
        return 0
    with tempfile.TemporaryDirectory() as directory:
        print("Training a tiny Qwen2 LM on an embedded text (CPU)...", flush=True)
        loss = train(directory, arguments.target_loss)
        print("Trained to loss %.3f; reloading it through each flow, each column in a fresh interpreter.\n"
              "Uninitialised memory is filled with NaN / max-int (torch's deterministic mode), so a\n"
              "broken flow shows as nan instead of a random, sometimes lucky, loss.\n" % loss)
        without, with_fix = _run_flows(directory, False), _run_flows(directory, True)
    print(format_table(without, with_fix))
    broken = [name for name, (value, _) in with_fix.items() if isinstance(value, str) or value > loss + 0.05]
    print("\nWith bufferfix, every flow matches from_pretrained." if not broken
          else "\nStill broken with bufferfix: %s" % ", ".join(broken))
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
