"""The torchtune sweep: every model-level component builder (the builders behind every
``torchtune.models.*`` model builder: llama2 / 3 / 3.1 / 3.2, gemma, gemma2, mistral, phi3, qwen2,
t5, their classifiers), with tiny dims, plain and with LoRA and DoRA, through every flow of the
harness and torchtune's own recipe path (meta build, then ``load_from_full_model_state_dict``
without the recipes' manual ``rope_init()``).

The recipe path with the recipes' manual ``m.rope_init()`` is measured too (torchtune's own fix).
Builders importing torchvision (clip, llama3_2_vision, flux) are left out: PyPI's torchvision does
not import beside the CPU torch 2.13.

    python -m sweeps.torchtune [--json out.json] [name ...]     # from tests/, in a venv with torchtune
"""
import importlib
import inspect
import pkgutil
import sys

import torch

from . import harness

TINY = dict(vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, head_dim=16,
            intermediate_dim=128, max_seq_len=64, lora_rank=4, lora_alpha=8.0, num_classes=3, mlp_dim=128,
            rel_pos_num_buckets=8, rel_pos_max_dist=16, norm_eps=1e-6, query_pre_attn_scalar=16,
            lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True,
            apply_lora_to_output=False)
RECIPE = "torchtune recipe (meta, load_from_full_model_state_dict)"
RECIPE_WITH_ROPE_INIT = "torchtune recipe + manual rope_init()"


def _families():
    import torchtune.models as models

    for info in pkgutil.iter_modules(models.__path__):
        try:
            yield info.name, importlib.import_module("torchtune.models.%s._component_builders" % info.name)
        except ImportError:  # no component builders, or torchvision (clip, llama3_2_vision)
            continue


def builders():
    """[(name, builder function, keyword arguments)]: model-level builders, plain / LoRA / DoRA."""
    found = []
    for family, module in _families():
        for name, function in sorted(vars(module).items()):
            if not inspect.isfunction(function) or function.__module__ != module.__name__ or name.startswith("_"):
                continue
            parameters = inspect.signature(function).parameters
            if "num_layers" not in parameters:  # attention / mlp pieces
                continue
            kwargs = {key: value for key, value in TINY.items() if key in parameters}
            if "use_dora" in parameters:
                found.append(("%s.%s" % (family, name), function, dict(kwargs, use_dora=False)))
                found.append(("%s.%s(use_dora)" % (family, name), function, dict(kwargs, use_dora=True)))
            else:
                found.append(("%s.%s" % (family, name), function, kwargs))
    return found


def _initialise_dora(model):
    """What the recipes do after loading; here in the build so that a normal build is deterministic."""
    for module in model.modules():
        if hasattr(module, "initialize_dora_magnitude") and not module.magnitude.is_meta:
            module.initialize_dora_magnitude()
    return model


_PROCESS_GROUP = []


def load_from_full_model_state_dict(model, state):
    """What torchtune's ``training.load_from_full_model_state_dict`` does on torch >= 2.6 (an
    un-sharded model: ``set_model_state_dict(full_state_dict, broadcast_from_rank0)``), in a
    one-process gloo group.  ``torchtune.training`` itself does not import beside torchao 0.17
    (``int4_weight_only`` is gone), which is why it is not called."""
    import tempfile

    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not dist.is_initialized():
        _PROCESS_GROUP.append(tempfile.TemporaryDirectory(prefix="bufferfix-sweep-pg-"))
        store = "file://%s/store" % _PROCESS_GROUP[-1].name
        dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    return set_model_state_dict(model=model, model_state_dict=state, options=options)


def _recipe(rope_init):
    def load(build, reference):
        with torch.device("meta"):
            model = build()
        if rope_init:
            with torch.device("cpu"):
                for module in model.modules():
                    if hasattr(module, "rope_init"):
                        module.rope_init()
        state = {name: tensor.clone() for name, tensor in reference.state_dict().items()}
        load_from_full_model_state_dict(model, state)
        return model

    return load


def _tokens(model):
    length = TINY["max_seq_len"] if "T5" in type(model).__name__ else 8  # t5_encoder takes exactly max_seq_len
    return dict(tokens=torch.randint(0, TINY["vocab_size"], (2, length), generator=torch.Generator().manual_seed(1)))


LOADERS = {RECIPE: harness.Flow(_recipe(False)), RECIPE_WITH_ROPE_INIT: harness.Flow(_recipe(True), fixes=RECIPE)}


def cases():
    return [harness.Case("torchtune." + name, lambda function=function, kwargs=kwargs: _initialise_dora(
        function(**kwargs)), inputs=_tokens, loaders=LOADERS) for name, function, kwargs in builders()]


def _version():
    import torchtune

    return "torchtune %s, torch %s" % (torchtune.__version__, torch.__version__)


LIBRARY = harness.Library("torchtune", cases, _version)

if __name__ == "__main__":
    sys.exit(harness.main(LIBRARY))
