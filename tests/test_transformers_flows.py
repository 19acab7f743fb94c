"""The seed report's models (Llama, Qwen2, BERT from tiny configs) through every meta flow."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from compare import assert_matches_reference, broken_buffers  # noqa: E402

from bufferfix.flows import FLOWS  # noqa: E402

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
MODELS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **TINY)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=2, **TINY)),
    "bert": lambda: transformers.BertModel(transformers.BertConfig(max_position_embeddings=32, **TINY)),
}


def _reference(model):
    torch.manual_seed(0)
    return MODELS[model]().eval()


def _outputs(model):
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        output = model.eval()(input_ids=ids)
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


@pytest.mark.parametrize("flow", FLOWS)
@pytest.mark.parametrize("model", MODELS)
def test_flow_gives_reference_buffers_and_outputs(model, flow):
    reference = _reference(model)
    materialised = FLOWS[flow](MODELS[model], reference.state_dict())
    assert_matches_reference(materialised, reference)
    assert torch.equal(_outputs(materialised), _outputs(reference))


@pytest.mark.parametrize("flow", FLOWS)
@pytest.mark.parametrize("model", MODELS)
def test_flow_is_broken_without_bufferfix(model, flow, without_bufferfix):
    reference = _reference(model)
    try:
        materialised = FLOWS[flow](MODELS[model], reference.state_dict())
        outputs = _outputs(materialised)
    except (IndexError, RuntimeError):
        return  # BERT's garbage position_ids index out of range: broken, loudly
    assert broken_buffers(materialised, reference) != []
    assert not torch.equal(outputs, _outputs(reference))
