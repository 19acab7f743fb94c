"""The torchtitan sweep: every ``debugmodel*`` flavor of every torchtitan model that imports on CPU,
made smaller still (2 layers, a short RoPE table), through every flow of the harness and torchtitan's
own trainer path (``to_empty`` then ``init_weights(buffer_device=None)``, as ``Trainer`` does on one
device, then the checkpoint's state dict).

torchtitan 0.3.0 imports triton at import time (its MoE token dispatcher), so it needs the
``triton`` wheel even on CPU.  qwen3_5 needs flash-linear-attention (``fla``) and is left out.

    python -m sweeps.torchtitan [--json out.json] [name ...]     # from tests/
"""
import dataclasses
import importlib
import sys

import torch

from . import harness

FAMILIES = ["llama3", "qwen3", "qwen3_5", "deepseek_v3", "gpt_oss", "kimi_k2_7", "muse_glimmer", "flux"]
MAX_SEQ_LEN = 64
TRAINER = "torchtitan trainer (to_empty, init_weights(buffer_device))"


def _shrink(config, seen=None):
    """Fewer layers (the first and the last, so dense and MoE layers both stay) and short RoPE tables,
    in place, through nested config dataclasses."""
    seen = set() if seen is None else seen
    if id(config) in seen:
        return config
    seen.add(id(config))
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        for field in dataclasses.fields(config):
            value = getattr(config, field.name, None)
            if field.name in ("max_seq_len", "original_max_position_embeddings", "original_seq_len") and \
                    isinstance(value, int) and value > MAX_SEQ_LEN:
                object.__setattr__(config, field.name, MAX_SEQ_LEN)
            elif field.name == "layers" and isinstance(value, list) and len(value) > 2:
                object.__setattr__(config, field.name, [value[0], value[-1]])
            _shrink(getattr(config, field.name, None), seen)
    elif isinstance(config, (list, tuple)):
        for item in config:
            _shrink(item, seen)
    elif isinstance(config, dict):
        for item in config.values():
            _shrink(item, seen)
    return config


def flavors():
    """[(family, flavor, registry)] for every debug flavor of every family that imports."""
    found, missing = [], {}
    for family in FAMILIES:
        try:
            module = importlib.import_module("torchtitan.models." + family)
        except ImportError as exc:
            missing[family] = "%s: %s" % (type(exc).__name__, exc)
            continue
        for name, table in sorted(vars(module).items()):
            if name.endswith("_configs") and isinstance(table, dict):
                found += [(family, flavor, module.model_registry) for flavor in table if "debug" in flavor]
    return found, missing


def _config(registry, flavor):
    return _shrink(registry(flavor).model)


def _trainer(build, reference):
    with torch.device("meta"):
        model = build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.load_state_dict(reference.state_dict())
    return model


LOADERS = {TRAINER: harness.Flow(_trainer)}


def _tokens(model):
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 256
    tokens = torch.randint(0, min(vocab, 256), (2, 8), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(8).expand(2, 8)
    return dict(tokens=tokens, positions=positions, attention_masks=model.get_attention_masks(positions))


def cases():
    found, missing = flavors()
    result = []
    for family, flavor, registry in found:
        def build(registry=registry, flavor=flavor):
            return _config(registry, flavor).build()

        result.append(harness.Case("torchtitan.%s.%s" % (family, flavor), build,
                                   inputs=None if family == "flux" else _tokens, loaders=LOADERS))
    for family, why in missing.items():
        def cannot(why=why):
            raise ImportError(why)

        result.append(harness.Case("torchtitan.%s" % family, cannot))
    return result


def _version():
    from importlib.metadata import version

    return "torchtitan %s, torch %s" % (version("torchtitan"), torch.__version__)


LIBRARY = harness.Library("torchtitan", cases, _version)

if __name__ == "__main__":
    sys.exit(harness.main(LIBRARY))
