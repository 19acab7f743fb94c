"""Lightning Fabric: ``fabric.init_module(empty_init=True)`` (meta device) -> ``fabric.setup`` -> ``fabric.load_raw``.

Fabric's ``FSDPStrategy`` (FSDP1) cannot run on CPU: the connector refuses it ("You selected the
FSDP strategy but FSDP is only available on GPU"), and it passes ``device_id=root_device.index``
(None on CPU), which torch's FSDP1 refuses too.  Fabric's FSDP2 strategy, ``ModelParallelStrategy``
with a ``parallelize_fn`` that calls ``fully_shard``, runs on CPU/gloo; it materialises with
``module.to_empty(device)`` + ``reset_parameters()`` (``_materialize_distributed_module``), the
torchtitan recipe.
"""
import os

import _harness as h  # first: imports bufferfix before torch
import torch
import torch.distributed as dist
import transformers


def _parallelize(model, device_mesh):
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh["data_parallel"]
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fabric_fsdp2_empty_init():
    import lightning.fabric
    from lightning.fabric.strategies import ModelParallelStrategy

    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(h.llama_config()).eval()
    reference_logits = h.logits_of(reference)
    checkpoint = os.path.join(h.OUT, "lightning_reference.pt")
    if h.rank() == 0:
        torch.save(reference.state_dict(), checkpoint)
    dist.barrier()

    strategy = ModelParallelStrategy(parallelize_fn=_parallelize, data_parallel_size=2, tensor_parallel_size=1)
    fabric = lightning.fabric.Fabric(accelerator="cpu", devices=2, strategy=strategy)
    fabric.launch()  # under torchrun: joins the existing process group
    with fabric.init_module(empty_init=True):
        model = transformers.LlamaForCausalLM(h.llama_config())
    model = fabric.setup(model)
    fabric.load_raw(checkpoint, model)
    # buffers of the module Fabric wraps; logits through Fabric's wrapper, as a user would run it
    return h.compare(model.module, reference, reference_logits, logits=h.logits_of(model))


FLOWS = {"fabric_fsdp2_empty_init": fabric_fsdp2_empty_init}

if __name__ == "__main__":
    h.main(FLOWS, __doc__)
