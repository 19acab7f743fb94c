"""The transformers sweep: transformers' architectures, tiny, through every meta flow.

Each architecture is built from its default config shrunk (tests/sweeps/transformers.py), once
normally as the reference and then through every flow of the sweep harness plus save_pretrained ->
from_pretrained, with and without bufferfix; non-persistent buffers, plain tensor attributes, tensors
in containers, their sharing, the state dict and (where a generic input exists) the outputs must
match bit for bit, with no bufferfix warning.

CI runs a fixed subset, one architecture per kind of non-persistent buffer.  The full sweep is slow
(tens of minutes on 2 cores) and ends with a summary (the numbers, skipped architectures and why,
everything broken with bufferfix)::

    python -m pytest -m slow tests/test_architecture_sweep.py
    cd tests && python -m sweeps.transformers          # the same sweep as a command

``BUFFERFIX_SWEEP_JSON=path`` makes the pytest sweep also write every result as JSON
(``python -m sweeps.transformers --from-json path`` prints its summary again).
"""
import functools

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from sweeps import harness  # noqa: E402
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
    return harness.check(sweep.case(model_type))


@pytest.mark.parametrize("model_type", SUBSET)
def test_subset_gives_the_reference_in_every_flow(model_type):
    result = checked(model_type)
    harness.assert_exact_with_bufferfix(result)  # and warns about nothing
    assert result.parameters < 2_000_000, "no longer tiny, CI would slow down: %s" % result.level
    assert result.inputs.startswith("compared"), result.inputs
    assert set(result.with_bufferfix) == set(harness.GENERIC_FLOWS) | {sweep.FROM_PRETRAINED}


@pytest.mark.parametrize("model_type", SUBSET)
def test_subset_is_broken_without_bufferfix(model_type):
    """Each architecture of the subset earns its place: its buffers really are lost without bufferfix."""
    result = checked(model_type)
    assert result.buffers or result.attributes
    harness.assert_broken_without_bufferfix(result, flows=[FLOW])


# --------------------------------------------------------------------------- the full sweep (slow)

ARCHITECTURES = sweep.architectures()
WITHOUT_MODEL_CLASS = sorted(model_type for model_type, name in ARCHITECTURES.items() if name is None)


@pytest.fixture(scope="module")
def sweep_results(request):
    """Collects every result of the full sweep; prints the summary (and writes JSON) at the end."""
    results = [harness.check(sweep.case(model_type)) for model_type in WITHOUT_MODEL_CLASS]  # skipped: no class
    yield results
    harness.report_at_end(request, sweep.LIBRARY, results)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(set(ARCHITECTURES) - set(WITHOUT_MODEL_CLASS)))
def test_every_architecture(model_type, sweep_results):
    harness.in_full_sweep(harness.check(sweep.case(model_type, ARCHITECTURES[model_type])), sweep_results, exact=True)
