"""The PEFT sweep: every tuner type PEFT registers, on a tiny transformers Llama, through every flow
of the harness and PEFT's own loading paths (the reference: ``get_peft_model`` on a normally built
base).

PEFT's own paths:

- ``get_peft_model`` on a base model built under ``torch.device("meta")``, then ``to_empty`` + load;
- ``PeftModel.from_pretrained(meta base, adapter, low_cpu_mem_usage=True)``, then ``to_empty`` + load;
- ``LlamaForCausalLM.from_pretrained`` (transformers' own meta loading) then
  ``PeftModel.from_pretrained(..., low_cpu_mem_usage=True)`` from a ``save_pretrained`` directory.

Tuners whose projections are not saved (VeRA, RandLoRA, ... with ``save_projection=False``) are
run both ways.  A tuner type whose config cannot be made for a causal LM is listed as skipped.

    python -m sweeps.peft [--json out.json] [name ...]     # from tests/
"""
import os
import sys
import tempfile

import torch

from . import harness

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGETS = ["q_proj", "v_proj"]
# Per tuner type: the keyword arguments its config needs beyond a task type and target modules.
EXTRA = {
    "PROMPT_TUNING": dict(num_virtual_tokens=4),
    "MULTITASK_PROMPT_TUNING": dict(num_virtual_tokens=4, num_tasks=2),
    "P_TUNING": dict(num_virtual_tokens=4, encoder_hidden_size=32),
    "PREFIX_TUNING": dict(num_virtual_tokens=4),
    "CPT": dict(cpt_token_ids=[1, 2, 3], cpt_mask=[1, 1, 1], cpt_tokens_type_mask=[1, 2, 2]),
    "CARTRIDGE": dict(num_virtual_tokens=4),
    "ADAPTION_PROMPT": dict(adapter_len=4, adapter_layers=1),
    "ADALORA": dict(total_step=10, init_r=4, target_r=2),
    "BOFT": dict(boft_block_size=4),
    "OFT": dict(r=0, oft_block_size=4),
    "POLY": dict(n_tasks=2),
    "VBLORA": dict(vector_length=16, num_vectors=32),
    "LN_TUNING": dict(target_modules=["input_layernorm"]),
    "TRAINABLE_TOKENS": dict(token_indices=[1, 2]),
    "SHIRA": dict(r=4),
    "FOURIERFT": dict(n_frequency=16),
    "LORA": dict(r=4),
    "VERA": dict(r=4),
    "RANDLORA": dict(r=4),
    "C3A": dict(block_size=16),
    "ROAD": dict(target_modules=["q_proj", "o_proj"]),  # out_features must divide by its group size (64)
    "WAVEFT": dict(n_frequency=16),
    "XLORA": None,  # needs trained adapter checkpoints to mix
}
NO_TARGETS = {"PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "CPT", "CARTRIDGE",
              "ADAPTION_PROMPT", "TRAINABLE_TOKENS"}
VARIANTS = {  # tuner type -> [(name suffix, extra config arguments)]
    "LORA": [("", {}), ("(use_dora)", dict(use_dora=True))],
}
PROJECTION_TYPES = {"VERA", "RANDLORA", "PVERA", "UNILORA"}
GET_PEFT_MODEL_META = "get_peft_model(meta base)"
FROM_PRETRAINED_META = "PeftModel.from_pretrained(meta base, low_cpu_mem_usage)"
FROM_PRETRAINED = "from_pretrained(base) + PeftModel.from_pretrained(low_cpu_mem_usage)"


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)


def base_model():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(llama_config())


def tuner_configs():
    """[(name, PeftConfig or the reason it cannot be made)] for every registered tuner type."""
    import dataclasses

    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    found = []
    for peft_type in sorted(PEFT_TYPE_TO_CONFIG_MAPPING, key=lambda t: t.value):
        name, cls = peft_type.value, PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
        extra = EXTRA.get(name, {})
        if extra is None:
            found.append((name, "needs trained adapters to mix (not a tuner of its own)"))
            continue
        fields = {f.name for f in dataclasses.fields(cls)}
        base = dict(task_type="CAUSAL_LM")
        if name not in NO_TARGETS and "target_modules" in fields:
            base["target_modules"] = TARGETS
        if "r" in fields and "r" not in extra and name not in ("OFT",):
            base["r"] = 4
        variants = VARIANTS.get(name, [("", {})])
        if name in PROJECTION_TYPES and "save_projection" in fields:
            variants = [("(save_projection=False)", dict(save_projection=False)),
                        ("(save_projection=True)", dict(save_projection=True))]
        for suffix, more in variants:
            try:
                found.append((name + suffix, cls(**dict(base, **extra, **more))))
            except Exception as exc:  # noqa: BLE001
                found.append((name + suffix, "config: " + harness.error_text(exc, 300)))
    return found


def _peft_model(config):
    import copy

    from peft import get_peft_model

    return get_peft_model(base_model(), copy.deepcopy(config))


def _get_peft_model_meta(config):
    def load(build, reference):
        import copy

        from peft import get_peft_model

        torch.manual_seed(0)
        with torch.device("meta"):
            base = base_model()
        model = get_peft_model(base, copy.deepcopy(config))
        model.to_empty(device="cpu")
        model.load_state_dict(reference.state_dict())
        return model

    return load


def _from_pretrained_meta(config):
    def load(build, reference):
        from peft import PeftModel

        with tempfile.TemporaryDirectory() as directory:
            reference.save_pretrained(directory)
            torch.manual_seed(0)
            with torch.device("meta"):
                base = base_model()
            model = PeftModel.from_pretrained(base, directory, low_cpu_mem_usage=True)
        model.to_empty(device="cpu")
        model.load_state_dict(reference.state_dict())
        return model

    return load


def _from_pretrained(config):
    def load(build, reference):
        from peft import PeftModel
        from transformers import LlamaForCausalLM

        with tempfile.TemporaryDirectory() as directory:
            torch.manual_seed(0)
            base_model().save_pretrained(os.path.join(directory, "base"))
            reference.save_pretrained(os.path.join(directory, "adapter"))
            base = LlamaForCausalLM.from_pretrained(os.path.join(directory, "base"))
            return PeftModel.from_pretrained(base, os.path.join(directory, "adapter"), low_cpu_mem_usage=True)

    return load


def _input_ids(model):
    return dict(input_ids=torch.randint(3, 120, (2, 8), generator=torch.Generator().manual_seed(1)))


def cases():
    found = []
    for name, config in tuner_configs():
        if isinstance(config, str):
            def cannot(why=config):
                raise TypeError(why)

            found.append(harness.Case("peft." + name, cannot))
            continue
        found.append(harness.Case(
            "peft." + name, lambda config=config: _peft_model(config), inputs=_input_ids,
            loaders={GET_PEFT_MODEL_META: harness.Flow(_get_peft_model_meta(config)),
                     FROM_PRETRAINED_META: harness.Flow(_from_pretrained_meta(config), from_files=True),
                     FROM_PRETRAINED: harness.Flow(_from_pretrained(config), from_files=True)}))
    return found


def _version():
    import peft
    import transformers

    return "peft %s, transformers %s, torch %s" % (peft.__version__, transformers.__version__, torch.__version__)


def _quiet():
    import transformers

    transformers.logging.set_verbosity_error()


LIBRARY = harness.Library("peft", cases, _version, quiet=_quiet)

if __name__ == "__main__":
    sys.exit(harness.main(LIBRARY))
