"""PyTorch's own FSDP flows on a meta-built transformers Llama, plus a rank-0-only materialisation.

Run: torchrun --nproc_per_node 2 tests/distributed/torch_fsdp.py --out DIR [--only a,b]
Every rank builds the reference (seed 0, normal build) itself; rank 0 is the one that feeds the
full state dict where a flow broadcasts it.
"""
import _harness as h  # first: imports bufferfix before torch
import torch
import transformers
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

CPU = torch.device("cpu")


def _reference():
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(h.llama_config()).eval()
    return reference, h.logits_of(reference)


def _meta_llama():
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(h.llama_config())


def _load_broadcast_from_rank0(model, reference):
    """torch.distributed.checkpoint: rank 0 holds the full state dict and broadcasts it."""
    full = reference.state_dict() if h.rank() == 0 else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def fsdp2():
    """fully_shard every decoder layer and the root on meta -> to_empty -> DCP full-state-dict load."""
    from torch.distributed.fsdp import fully_shard

    reference, reference_logits = _reference()
    model = _meta_llama()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")
    _load_broadcast_from_rank0(model, reference)
    return h.compare(model, reference, reference_logits)


def fsdp2_load_without_to_empty():
    """fully_shard on meta, then straight to the DCP load: it finds meta tensors and loads with
    assign=True, so parameters become real and nothing ever materialises the buffers."""
    from torch.distributed.fsdp import fully_shard

    reference, reference_logits = _reference()
    model = _meta_llama()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    _load_broadcast_from_rank0(model, reference)
    return h.compare(model, reference, reference_logits)


def _fsdp1(model, sync_module_states, param_init_fn):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    # device_id: FSDP1 refuses device_id=None when no accelerator exists ("FSDP needs a non-CPU
    # accelerator device"); naming the CPU is its supported CPU mode.
    return FullyShardedDataParallel(
        model, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), device_id=CPU,
        param_init_fn=param_init_fn, sync_module_states=sync_module_states,
    )


def _to_empty_per_module(module):
    module.to_empty(device=CPU, recurse=False)


def fsdp1():
    """FSDP1(meta model, param_init_fn=to_empty(recurse=False)) -> FULL_STATE_DICT load_state_dict."""
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

    reference, reference_logits = _reference()
    model = _fsdp1(_meta_llama(), False, _to_empty_per_module)
    with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT,
                                                  FullStateDictConfig(rank0_only=False)):
        model.load_state_dict(reference.state_dict())
    return h.compare(model, reference, reference_logits)


def fsdp1_sync_module_states():
    """Same, with sync_module_states=True (rank 0's buffers are broadcast to every rank), then the
    DCP full-state-dict load broadcast from rank 0."""
    reference, reference_logits = _reference()
    with h.fsdp1_sync_module_states_on_cpu():
        model = _fsdp1(_meta_llama(), True, _to_empty_per_module)
    _load_broadcast_from_rank0(model, reference)
    return h.compare(model, reference, reference_logits)


def fsdp1_sync_module_states_rank0_real():
    """Control: rank 0 holds a real, loaded model, the others a meta one (the cpu_ram_efficient_loading
    layout); sync_module_states broadcasts rank 0's buffers, so this is right even without bufferfix."""
    reference, reference_logits = _reference()
    if h.rank() == 0:
        model = transformers.LlamaForCausalLM(h.llama_config())
        model.load_state_dict(reference.state_dict())
    else:
        model = _meta_llama()
    with h.fsdp1_sync_module_states_on_cpu():
        model = _fsdp1(model, True, _to_empty_per_module)
    return h.compare(model, reference, reference_logits)


@h.ends_the_job
def rank0_only_materialises():
    """Only rank 0 materialises; rank 1 builds on meta and leaves at once.  Restoring the buffers
    must need no collective: counted on rank 0, and with rank 1 gone any would fail or hang."""
    if h.rank() != 0:
        _meta_llama()  # never materialised
        return {"materialised": False}
    reference, reference_logits = _reference()
    model = _meta_llama()
    with h.counting_collectives() as calls:
        model.to_empty(device="cpu")
        model.load_state_dict(reference.state_dict())
    report = h.compare(model, reference, reference_logits)
    report["collectives_while_materialising"] = calls
    return report


FLOWS = {
    "fsdp2": fsdp2,
    "fsdp2_load_without_to_empty": fsdp2_load_without_to_empty,
    "fsdp1": fsdp1,
    "fsdp1_sync_module_states": fsdp1_sync_module_states,
    "fsdp1_sync_module_states_rank0_real": fsdp1_sync_module_states_rank0_real,
    "rank0_only_materialises": rank0_only_materialises,  # runs last: rank 1 leaves the job after it
}

if __name__ == "__main__":
    h.main(FLOWS, __doc__)
