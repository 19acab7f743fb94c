"""Models and sizes the benchmarks build (imported by ``worker.py`` only; needs torch).

Two families:

* ``llama``: transformers' ``LlamaForCausalLM`` at a named shape.  In transformers >= 4.45
  its only non-persistent buffers are the model-level rotary embedding's (one module, however
  many layers), so bufferfix's cost should not grow with the layer count.
* ``perlayer``: a hand-written decoder whose *every layer* owns non-persistent buffers (a causal
  mask, and a rotary module with ``inv_freq`` and cos/sin caches), as many older or custom
  models do.  Layers are built with identical arguments, so bufferfix should replay each
  distinct constructor once however many layers there are.
"""
import contextlib

import torch
from torch import nn

# Llama shapes.  ``llama70b``/``llama3b``/``llama1b`` follow Meta's published configurations; the others
# are small stand-ins with the same structure (used by --quick and from_pretrained/forward).
LLAMA = {
    "llama70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                     intermediate_size=28672, vocab_size=128256, max_position_embeddings=131072,
                     rope_theta=500000.0, tie_word_embeddings=False),
    "llama1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                    intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072,
                    rope_theta=500000.0, tie_word_embeddings=True),
    "llama3b": dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                    intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072,
                    rope_theta=500000.0, tie_word_embeddings=True),
    "small": dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=4,
                  intermediate_size=2048, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=False),
}

# A DeepSeek-V3-shaped mixture of experts (hidden, expert and attention sizes as published), every
# layer sparse: with transformers 4.x one module per expert (transformers 5 fuses them), so a
# meta build constructs thousands of modules per layer.
MOE = {
    "deepseek-v3": dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=2,
                        first_k_dense_replace=0, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
                        n_group=8, topk_group=4, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
                        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                        vocab_size=129280, max_position_embeddings=163840, tie_word_embeddings=False),  # 2 of its 61 layers
    "deepseek-tiny": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=1,
                          first_k_dense_replace=0, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                          n_group=2, topk_group=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32,
                          kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                          vocab_size=256, max_position_embeddings=256, tie_word_embeddings=False),
}

# Per-layer-buffer decoder shapes.
PERLAYER = {
    "perlayer": dict(vocab=32000, hidden=512, layers=16, heads=8, intermediate=1408, max_positions=512),
    "perlayer-tiny": dict(vocab=256, hidden=64, layers=2, heads=4, intermediate=128, max_positions=64),
}

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@contextlib.contextmanager
def default_dtype(dtype):
    """What ``from_config(dtype=...)``/``from_pretrained(dtype=...)`` do around construction."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class RotaryCache(nn.Module):
    """Rotary embedding with precomputed cos/sin tables (all non-persistent)."""

    def __init__(self, head_dim, max_positions, base=10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        table = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos_cached", table.cos(), persistent=False)
        self.register_buffer("sin_cached", table.sin(), persistent=False)


class Block(nn.Module):
    def __init__(self, hidden, heads, intermediate, max_positions):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.proj = nn.Linear(hidden, hidden, bias=False)
        self.norm2 = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)
        self.rotary = RotaryCache(hidden // heads, max_positions)
        self.register_buffer("causal_mask", torch.ones(max_positions, max_positions, dtype=torch.bool).tril(),
                             persistent=False)


class PerLayerLM(nn.Module):
    def __init__(self, vocab, hidden, layers, heads, intermediate, max_positions):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads, intermediate, max_positions) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)


def llama_config(preset, **overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**dict(LLAMA[preset], **overrides))


def build(spec, config=None):
    """Build the model described by ``spec`` on the current default device.

    ``spec``: ``{"family": "llama"|"perlayer", "preset": name, "layers": int or None,
    "dtype": "bfloat16"|"float32", "hidden": int or None}``.  ``config`` reuses a LlamaConfig.
    ``"moe"`` builds ``DeepseekV3ForCausalLM`` at a :data:`MOE` preset.
    """
    dtype = DTYPES[spec.get("dtype", "float32")]
    with default_dtype(dtype):
        if spec["family"] == "llama":
            from transformers import LlamaForCausalLM

            return LlamaForCausalLM(config if config is not None else make_config(spec))
        if spec["family"] == "moe":
            from transformers import DeepseekV3ForCausalLM

            return DeepseekV3ForCausalLM(config if config is not None else make_config(spec))
        shape = dict(PERLAYER[spec["preset"]])
        if spec.get("layers"):
            shape["layers"] = spec["layers"]
        if spec.get("hidden"):
            shape["hidden"] = spec["hidden"]
        return PerLayerLM(**shape)


def make_config(spec):
    overrides = {}
    if spec.get("layers"):
        overrides["num_hidden_layers"] = spec["layers"]
    if spec.get("hidden"):
        overrides["hidden_size"] = spec["hidden"]
    if spec["family"] == "moe":
        from transformers import DeepseekV3Config

        return DeepseekV3Config(**dict(MOE[spec["preset"]], **overrides))
    return llama_config(spec["preset"], **overrides)


def reference_spec(spec):
    """A spec whose normal (CPU) build has the same non-persistent buffer values, cheaply.

    Llama's only non-persistent buffers are the rotary embedding's, which depend on the head
    size and rope settings only: one layer and a small vocabulary give the same values.
    A per-layer model's layers are identical: one layer gives every layer's values.
    """
    reduced = dict(spec, layers=1)
    if spec["family"] == "llama":
        reduced["vocab"] = 256
    return reduced


def build_reference(spec):
    """Normal CPU build of :func:`reference_spec` (weights initialised, as a user would get)."""
    reduced = reference_spec(spec)
    if spec["family"] == "llama":
        config = make_config(reduced)
        config.vocab_size = 256
        return build(reduced, config)
    return build(reduced)
