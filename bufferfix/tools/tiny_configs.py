"""A transformers model type's default config, shrunk to a tiny size, generically.

Size attributes (layers, widths, heads, vocabulary, positions, image size...) are overridden in
the config and in each of its sub-configs; nothing is downloaded.  Used by the doctor
(``bufferfix doctor llama``) and by the architecture sweep (``tests/sweeps/transformers.py``), which runs it on
every model type transformers ships.  :data:`LEVELS` go from the smallest to the default config:
callers take the first level whose model builds.  Imports transformers.
"""
from __future__ import annotations

import re
from collections.abc import Sequence, Set
from typing import TYPE_CHECKING, Any

from transformers.models.auto import configuration_auto

if TYPE_CHECKING:
    from transformers import PretrainedConfig

ConfigDict = dict[str, Any]  # a config as to_dict() gives it: JSON-like values of every kind

HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, VOCAB, POSITIONS = 64, 128, 4, 2, 16, 128, 128
LAYERS = 2

_LAYER_KEYS = {"num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers",
               "num_decoder_layers", "num_encoder_layers", "depth", "text_layers", "vision_layers"}
_HEAD_KEYS = {"num_attention_heads", "n_head", "n_heads", "encoder_attention_heads", "decoder_attention_heads",
              "num_heads", "attention_heads", "decoder_num_attention_heads"}
_KV_HEAD_KEYS = {"num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num"}
_WIDTH_KEYS = {"d_model", "n_embd", "n_embed", "embed_dim", "model_dim", "word_embed_proj_dim", "projection_dim",
               "embedding_size", "dim", "hidden_dim", "text_embed_dim", "vision_embed_dim", "emb_dim", "d_latents"}
_FFN_KEYS = {"ffn_dim", "d_ff", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim", "mlp_dim", "ffn_hidden_size",
             "feed_forward_size"}
_EXPERT_KEYS = {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"}
_TOP_K_KEYS = {"num_experts_per_tok", "moe_topk", "num_selected_experts"}
_MLA = {"kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
        "qk_head_dim": 16, "rotary_dim": HEAD_DIM // 2}
_SMALL = {"num_filters": 8, "codebook_dim": 16, "codebook_size": 64, "num_quantizers": 2,
          "vector_quantization_hidden_dimension": 16, "upsample_initial_channel": 32, "num_codevectors_per_group": 16,
          "codevector_dim": 32, "proj_codevector_dim": 32, "classifier_proj_size": 32, "xvector_output_dim": 32,
          "num_queries": 16, "encoder_hidden_dim": 64, "num_embeddings": 64}
_WIDTH_LISTS = {"conv_dim", "tdnn_dim", "hidden_sizes", "embed_dims", "neck_hidden_sizes", "encoder_in_channels",
                "decoder_in_channels", "channels"}
_POSITION_KEYS = {"max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_sequence_length"}
_TOKEN_ID = re.compile(r"(^|_)token_(id|index)$")

# How far a config is shrunk: the first level whose model builds (and is small enough) is used.
LEVELS: list[tuple[str, set[str]]] = [
    ("tiny", {"layers", "widths", "vocab", "positions", "images"}),
    ("tiny, full-size images", {"layers", "widths", "vocab", "positions"}),
    ("fewer layers, small vocab", {"layers", "vocab", "positions"}),
    ("fewer layers", {"layers"}),
    ("default config", set()),
]


def _smaller(value: object, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > limit


def _first_layers(per_layer: Sequence[Any]) -> Sequence[Any]:
    """A per-layer list cut to LAYERS entries, keeping each kind of layer when it can
    (["sliding"] * 5 + ["full"] becomes ["sliding", "full"]: hybrids need both)."""
    kinds = list(dict.fromkeys(v for v in per_layer if isinstance(v, str)))
    if len(kinds) < 2 or len(kinds) > LAYERS or set(per_layer[:LAYERS]) == set(kinds):
        return per_layer[:LAYERS]
    return kinds + [kinds[0]] * (LAYERS - len(kinds))


def _heads(value: int) -> int:
    """At most HEADS heads, and a number that divides HIDDEN."""
    heads = max(1, min(value, HEADS))
    while HIDDEN % heads:
        heads -= 1
    return heads


def _mamba_heads(d: ConfigDict) -> None:
    """Mamba mixers need heads * head_dim == expand * hidden_size."""
    for heads, head_dim, expand in (("mamba_n_heads", "mamba_d_head", "mamba_expand"),
                                    ("num_heads", "head_dim", "expand")):
        if all(isinstance(d.get(key), int) for key in (heads, head_dim, expand, "hidden_size")):
            d[heads] = max(1, d[expand] * d["hidden_size"] // d[head_dim])
    for key in ("mamba_d_state", "state_size", "ssm_state_size"):
        if _smaller(d.get(key), 16):
            d[key] = 16


def _shrink(d: ConfigDict, what: Set[str], token_ids: dict[int, int]) -> None:
    """Shrink one config dict in place (sub-config dicts are handled by the caller)."""
    hierarchical = isinstance(d.get("depths"), (list, tuple))  # num_layers counts stages there
    if "layers" in what:
        for key in _LAYER_KEYS & d.keys():
            if key == "num_layers" and hierarchical:
                continue
            old = d[key]
            if _smaller(old, LAYERS):
                d[key] = LAYERS
                for other, value in d.items():  # per-layer lists (layer_types, intermediate sizes...) follow
                    if isinstance(value, (list, tuple)) and len(value) == old:
                        d[other] = type(value)(_first_layers(value))
        if hierarchical:
            d["depths"] = [min(depth, 1) for depth in d["depths"]]
        if isinstance(d.get("attention_types"), list) and d["attention_types"]:  # GPT-Neo: [[kinds, repeat]]
            kinds = d["attention_types"][0][0]
            d["attention_types"] = [[kinds, max(1, LAYERS // len(kinds))]]
        if isinstance(d.get("per_layer_config"), dict):  # per-layer overrides, keyed by layer index
            d["per_layer_config"] = {k: v for k, v in d["per_layer_config"].items() if int(k) < LAYERS}
        for key in ("out_features", "out_indices", "_out_features", "_out_indices"):  # backbones: stage names
            d.pop(key, None)
    if "widths" in what:
        original = dict(d)
        for key, value in list(d.items()):
            if key.endswith("hidden_size") or key in _WIDTH_KEYS:
                if _smaller(value, HIDDEN):
                    d[key] = HIDDEN
            elif key.endswith("intermediate_size") or key in _FFN_KEYS:
                if _smaller(value, FFN):
                    d[key] = FFN
                elif isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
                    d[key] = type(value)(min(v, FFN) for v in value)
            elif key in _HEAD_KEYS or key.endswith("num_attention_heads"):
                if isinstance(value, int) and not isinstance(value, bool):
                    d[key] = _heads(value)
                elif isinstance(value, (list, tuple)):
                    d[key] = [_heads(v) if isinstance(v, int) else v for v in value]
            elif key in _KV_HEAD_KEYS and (value is None or _smaller(value, KV_HEADS)):
                heads = original.get("num_attention_heads")
                d[key] = HEADS if value is not None and value == heads else KV_HEADS  # MHA stays MHA
            elif key in ("head_dim", "attention_head_dim", "attention_head_size", "d_kv", "kv_channels") and (
                    _smaller(value, HEAD_DIM) or (value is None and key == "head_dim")):  # None: defaults that fail
                d[key] = HEAD_DIM
            elif key.endswith("groups") and _smaller(value, HIDDEN):  # e.g. grouped convolutions over the width
                d[key] = HIDDEN
            elif key in _SMALL and _smaller(value, _SMALL[key]):
                d[key] = _SMALL[key]
            elif key in _WIDTH_LISTS and isinstance(value, (list, tuple)) and value:
                d[key] = type(value)(min(v, HIDDEN // 2) if isinstance(v, int) else v for v in value)
            elif key in _EXPERT_KEYS and (value is None or _smaller(value, 4)):  # None: some defaults do not build
                d[key] = 4
            elif key in _TOP_K_KEYS and (value is None or _smaller(value, 2)):
                d[key] = 2
            elif key in ("n_group", "topk_group") and _smaller(value, 1):
                d[key] = 1
            elif key in _MLA and _smaller(value, _MLA[key]):
                d[key] = _MLA[key]
        _mamba_heads(d)
        if isinstance(d.get("axial_pos_embds_dim"), (list, tuple)):  # Reformer: must add up to hidden_size
            parts = list(d["axial_pos_embds_dim"])
            d["axial_pos_embds_dim"] = [p * HIDDEN // sum(parts) for p in parts[:-1]]
            d["axial_pos_embds_dim"].append(HIDDEN - sum(d["axial_pos_embds_dim"]))
        for key in ("rope_parameters", "rope_scaling"):
            rope = d.get(key)
            if isinstance(rope, dict) and isinstance(rope.get("mrope_section"), (list, tuple)):
                rotary = d.get("qk_rope_head_dim") or d.get("head_dim") or HEAD_DIM
                section, half = list(rope["mrope_section"]), rotary // 2  # must add up to the rotary dim / 2
                scaled = [max(1, s * half // sum(section)) for s in section]
                scaled[-1] += half - sum(scaled)
                d[key] = dict(rope, mrope_section=scaled)
    if "vocab" in what:
        for key, value in list(d.items()):
            if "vocab_size" in key and key != "type_vocab_size" and _smaller(value, 1000):
                d[key] = VOCAB
            elif _TOKEN_ID.search(key) and _smaller(value, VOCAB - 1):
                d[key] = token_ids.setdefault(value, VOCAB - 1 - len(token_ids))
    if d.get("use_timm_backbone"):  # timm is not a dependency: use transformers' own default backbone
        d.update(use_timm_backbone=False, backbone=None, use_pretrained_backbone=False, backbone_config=None,
                 backbone_kwargs=None)
    if d.get("prediction_length", 0) is None:  # time-series models have no default horizon
        d["prediction_length"] = 4
    if "positions" in what:
        for key in _POSITION_KEYS & d.keys():
            if _smaller(d[key], POSITIONS):
                d[key] = POSITIONS
    if "images" in what and "image_size" in d:
        patch = d.get("patch_size")
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        size = 2 * patch if isinstance(patch, int) and patch > 0 else 32
        if isinstance(d["image_size"], int) and d["image_size"] > size:
            d["image_size"] = size
        elif isinstance(d["image_size"], (list, tuple)) and all(s > size for s in d["image_size"]):
            d["image_size"] = [size] * len(d["image_size"])


def _shrink_tree(d: ConfigDict, what: Set[str], token_ids: dict[int, int]) -> None:
    for key, value in list(d.items()):
        if isinstance(value, dict) and value.get("model_type") == "timm_backbone":  # timm: not a dependency
            d[key], d["use_timm_backbone"] = None, False
    _shrink(d, what, token_ids)
    for value in d.values():
        if isinstance(value, dict) and "model_type" in value:  # a sub-config
            _shrink_tree(value, what, token_ids)


def tiny_config(model_type: str, what: Set[str]) -> PretrainedConfig:
    """The default config of ``model_type``, shrunk as far as ``what`` says."""
    config = configuration_auto.CONFIG_MAPPING[model_type]()
    if not what:
        return config
    d = config.to_dict()
    _shrink_tree(d, what, {})
    for key in ("transformers_version", "architectures", "_name_or_path"):
        d.pop(key, None)
    return type(config).from_dict(d)
