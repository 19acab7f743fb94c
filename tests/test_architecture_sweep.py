"""Issue 3, the architecture sweep: transformers' architectures, tiny, through every meta flow.

Each architecture is built from its default config shrunk (tests/sweep.py), once normally as the
reference and then through every flow of bufferfix.flows.FLOWS plus save_pretrained ->
from_pretrained, with and without bufferfix; non-persistent buffers, plain tensor attributes, their
sharing, the state dict and (where a generic input exists) the outputs must match bit for bit.

CI runs a fixed subset, one architecture per kind of non-persistent buffer.  The full sweep is slow
(tens of minutes on 2 cores) and ends with a summary (the four numbers, skipped architectures and
why, everything broken with bufferfix)::

    python -m pytest -m slow tests/test_architecture_sweep.py
    python tests/sweep.py --report          # the same sweep as a script

``BUFFERFIX_SWEEP_JSON=path`` makes the pytest sweep also write every result as JSON
(``python tests/sweep.py --from-json path`` prints its summary again).
"""
import contextlib
import functools
import os

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from sweeps import transformers as sweep  # noqa: E402

# One architecture per kind of non-persistent buffer (all have some in transformers 4.57 and 5.x;
# t5, bart, whisper, wav2vec2 and vit have none, so they would test nothing here).
SUBSET = {
    "llama": "rotary inv_freq (+ original_inv_freq: a buffer in 5.x, a plain attribute aliasing it in 4.x)",
    "qwen2": "rotary inv_freq",
    "gemma": "rotary inv_freq (+ the embedding's embed_scale in 5.x)",
    "phi": "partial rotary",
    "falcon": "rotary",
    "modernbert": "global and local rotary, per layer",
    "bert": "position_ids / token_type_ids index buffers",
    "gpt_neo": "bool causal-mask buffers",
    "reformer": "scalar mask-value buffers",
    "m2m_100": "sinusoidal position table, encoder-decoder",
    "speech_to_text": "sinusoidal position table, audio encoder-decoder",
    "mimi": "audio codec: rotary, conv padding buffers and plain tensor attributes",
    "levit": "attention-bias index buffers (vision)",
    "clip": "position_ids in text and vision towers",
    "codegen": "sinusoidal rotary table (a buffer in 5.x; plain tensor attributes in 4.x)",
}
FLOW = "torch.device('meta')"


@functools.cache
def checked(model_type):
    return sweep.check(model_type)


@pytest.mark.parametrize("model_type", SUBSET)
def test_subset_gives_the_reference_in_every_flow(model_type):
    result = checked(model_type)
    assert result.harness_error is None, result.harness_error
    assert result.skipped is None
    assert result.parameters < 2_000_000, "no longer tiny, CI would slow down: %s" % result.level
    assert result.inputs.startswith("compared"), result.inputs
    assert set(result.with_bufferfix) == set(sweep.ALL_FLOWS)
    assert result.broken() == {}, result.describe()


@pytest.mark.parametrize("model_type", SUBSET)
def test_subset_is_broken_without_bufferfix(model_type):
    """Each architecture of the subset earns its place: its buffers really are lost without bufferfix."""
    result = checked(model_type)
    assert result.buffers or result.attributes
    assert result.problems(FLOW, enabled=False), "%s is not broken without bufferfix" % model_type


# --------------------------------------------------------------------------- the full sweep (slow)

ARCHITECTURES = sweep.architectures()
WITHOUT_MODEL_CLASS = sorted(model_type for model_type, name in ARCHITECTURES.items() if name is None)


@pytest.fixture(scope="module")
def sweep_results(request):
    """Collects every result of the full sweep; prints the summary (and writes JSON) at the end."""
    results = [sweep.check(model_type) for model_type in WITHOUT_MODEL_CLASS]  # skipped: no model class
    yield results
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.line("")
            reporter.write_sep("=", "architecture sweep")
            reporter.write_line(sweep.summary(results))
    if os.environ.get("BUFFERFIX_SWEEP_JSON"):
        sweep.write_json(os.environ["BUFFERFIX_SWEEP_JSON"], results)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(set(ARCHITECTURES) - set(WITHOUT_MODEL_CLASS)))
def test_every_architecture(model_type, sweep_results):
    result = sweep.check(model_type, ARCHITECTURES[model_type])
    sweep_results.append(result)
    assert result.harness_error is None, result.harness_error
    if result.skipped:
        pytest.skip(result.skipped)
    assert result.broken() == {}, result.describe()
