"""transformers' own loading path: from_pretrained of saved models, custom ones included."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from compare import assert_matches_reference, broken_buffers  # noqa: E402

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


class SinusoidalConfig(transformers.PretrainedConfig):
    model_type = "bufferfix-sinusoidal"

    def __init__(self, positions=16, dim=8, **kwargs):
        self.positions, self.dim = positions, dim
        super().__init__(**kwargs)


class SinusoidalModel(transformers.PreTrainedModel):
    """What a new user writes: a PreTrainedModel with a sinusoidal table and a scalar buffer."""

    config_class = SinusoidalConfig

    def __init__(self, config):
        super().__init__(config)
        position = torch.arange(config.positions, dtype=torch.float32).unsqueeze(1)
        frequency = torch.exp(torch.arange(0, config.dim, 2).float() * (-math.log(10000.0) / config.dim))
        table = torch.cat([torch.sin(position * frequency), torch.cos(position * frequency)], dim=1)
        self.register_buffer("table", table, persistent=False)
        self.register_buffer("scale", torch.tensor(config.dim ** -0.5), persistent=False)
        self.proj = torch.nn.Linear(config.dim, config.dim)
        self.post_init()

    def forward(self, x):
        return self.proj(x + self.table[: x.shape[1]]) * self.scale


def _saved(tmp_path, build):
    torch.manual_seed(0)
    model = build()
    model.save_pretrained(tmp_path)
    return model


def test_custom_model_from_pretrained(tmp_path):
    reference = _saved(tmp_path, lambda: SinusoidalModel(SinusoidalConfig()))
    loaded = SinusoidalModel.from_pretrained(tmp_path)
    assert_matches_reference(loaded, reference)
    x = torch.randn(2, 5, 8)
    assert torch.equal(loaded(x), reference(x))


@pytest.mark.skipif(not TRANSFORMERS_5, reason="transformers 4.x keeps buffers real in from_pretrained")
def test_custom_model_from_pretrained_is_broken_without_bufferfix(tmp_path, without_bufferfix):
    reference = _saved(tmp_path, lambda: SinusoidalModel(SinusoidalConfig()))
    loaded = SinusoidalModel.from_pretrained(tmp_path)
    assert broken_buffers(loaded, reference) == ["scale", "table"]


def test_custom_model_from_pretrained_in_bf16(tmp_path):
    _saved(tmp_path, lambda: SinusoidalModel(SinusoidalConfig()))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # a normal build "with the same default dtype"
    try:
        torch.manual_seed(0)
        reference = SinusoidalModel(SinusoidalConfig())
    finally:
        torch.set_default_dtype(previous)
    loaded = SinusoidalModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert broken_buffers(loaded, reference) == []
    assert loaded.scale.dtype == torch.bfloat16 and loaded.table.dtype == torch.float32  # as in the normal build


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_builtin_models_from_pretrained(tmp_path, name):
    tiny = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    build = {
        "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **tiny)),
        "bert": lambda: transformers.BertModel(transformers.BertConfig(max_position_embeddings=32, **tiny)),
    }[name]
    reference = _saved(tmp_path, build)
    loaded = type(reference).from_pretrained(tmp_path)
    assert_matches_reference(loaded, reference)


class DerivedModel(transformers.PreTrainedModel):
    """Its _init_weights reads a buffer it does not write (``table``) to compute one it does."""

    config_class = SinusoidalConfig

    def __init__(self, config):
        super().__init__(config)
        table = torch.arange(config.positions * config.dim, dtype=torch.float32).reshape(config.positions, -1).sin()
        self.register_buffer("table", table, persistent=False)
        self.register_buffer("doubled", torch.zeros(config.positions, config.dim), persistent=False)
        self.proj = torch.nn.Linear(config.dim, config.dim)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if module is self:
            with torch.no_grad():
                self.doubled.copy_(self.table * 2)


def _counting_replays(monkeypatch):
    from bufferfix.mechanism import recipes

    replayed = []
    original = recipes._replay_uncached
    monkeypatch.setattr(recipes, "_replay_uncached", lambda recipe: replayed.append(recipe.cls) or original(recipe))
    return replayed


@pytest.mark.skipif(not TRANSFORMERS_5, reason="transformers 4.x keeps buffers real in from_pretrained")
def test_init_weights_reading_a_buffer_sees_its_value(tmp_path, monkeypatch):
    reference = _saved(tmp_path, lambda: DerivedModel(SinusoidalConfig()))
    assert torch.equal(reference.doubled, reference.table * 2)
    replayed = _counting_replays(monkeypatch)
    loaded = DerivedModel.from_pretrained(tmp_path)
    assert_matches_reference(loaded, reference)
    assert replayed == [DerivedModel]  # for table, when _init_weights read it; doubled was left to it


@pytest.mark.skipif(not TRANSFORMERS_5, reason="transformers 4.x keeps buffers real in from_pretrained")
def test_init_weights_reading_a_buffer_is_broken_without_bufferfix(tmp_path, without_bufferfix):
    reference = _saved(tmp_path, lambda: DerivedModel(SinusoidalConfig()))
    loaded = DerivedModel.from_pretrained(tmp_path)
    assert broken_buffers(loaded, reference) == ["doubled", "table"]


@pytest.mark.skipif(not TRANSFORMERS_5, reason="transformers 4.x keeps buffers real in from_pretrained")
def test_buffers_transformers_initialises_itself_cost_no_replay(tmp_path, monkeypatch):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    reference = _saved(tmp_path, lambda: transformers.LlamaForCausalLM(config))
    replayed = _counting_replays(monkeypatch)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    assert_matches_reference(loaded, reference)
    assert replayed == []  # LlamaRotaryEmbedding's buffers come from transformers' own _init_weights
