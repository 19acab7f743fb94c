"""accelerate's FSDP plugin (FSDP1 and FSDP2, cpu_ram_efficient_loading on and off) preparing a
transformers model loaded with ``from_pretrained`` from a checkpoint saved here.

The model is :class:`_custom_model.ScaledLlamaForCausalLM`, whose custom non-persistent buffer
transformers 5 leaves as garbage without bufferfix (on ranks > 0 under cpu_ram_efficient_loading:
zeros, by ``zeros_like``).

CPU adaptations (accelerate 1.15 / torch 2.13 only do FSDP with an accelerator), each the smallest
that lets accelerate's own code run unchanged from ``Accelerator.prepare`` on:

* ``AcceleratorState`` picks ``MULTI_CPU`` (DDP) on a CPU machine and ignores the FSDP plugin, so
  the state is switched to ``DistributedType.FSDP`` with the plugin after ``Accelerator()``.
* FSDP1 + cpu_ram_efficient_loading forces ``sync_module_states=True``, for which the plugin's
  ``__post_init__`` asks for the current accelerator device ("There are currently no available
  devices found") to build ``param_init_fn = to_empty(device, recurse=False)``: the same function
  is set with the CPU, and torch's CPU guard on sync_module_states is lifted
  (:func:`_harness.fsdp1_sync_module_states_on_cpu`).
* For the same reason cpu_ram_efficient_loading cannot come from ``accelerate launch``'s
  environment on CPU (launch insists on FSDP_SYNC_MODULE_STATES=true with it), so those two
  configurations pass the plugin to ``Accelerator(fsdp_plugin=...)``; the other two are driven by
  exactly the environment ``accelerate launch --use_fsdp`` sets (``accelerate/utils/launch.py``).
"""
import contextlib
import os

import _harness as h  # first: imports bufferfix before torch
import torch
from _custom_model import ScaledLlamaForCausalLM, reference_and_checkpoint

CPU = torch.device("cpu")


def _launch_environment(version, cpu_ram_efficient_loading):
    """What `accelerate launch --use_fsdp --fsdp_version V --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP
    --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer ...` puts into the environment."""
    return {
        "ACCELERATE_USE_FSDP": "true",
        "ACCELERATE_MIXED_PRECISION": "no",
        "FSDP_VERSION": str(version),
        "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
        "FSDP_RESHARD_AFTER_FORWARD": "true",
        "FSDP_OFFLOAD_PARAMS": "false",
        "FSDP_MIN_NUM_PARAMS": "0",
        "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer",
        "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT" if version == 1 else "SHARDED_STATE_DICT",
        "FSDP_FORWARD_PREFETCH": "false",
        "FSDP_USE_ORIG_PARAMS": "true",
        "FSDP_CPU_RAM_EFFICIENT_LOADING": str(cpu_ram_efficient_loading).lower(),
        "FSDP_SYNC_MODULE_STATES": str(cpu_ram_efficient_loading).lower(),
        "FSDP_ACTIVATION_CHECKPOINTING": "false",
        "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD": "false",
    }


@contextlib.contextmanager
def _environment(variables):
    saved = dict(os.environ)
    os.environ.update(variables)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _plugin(version, cpu_ram_efficient_loading):
    from accelerate.utils import FullyShardedDataParallelPlugin

    if not cpu_ram_efficient_loading:
        return FullyShardedDataParallelPlugin()  # from the environment, as Accelerator() itself does
    common = dict(fsdp_version=version, auto_wrap_policy="transformer_based_wrap",
                  transformer_cls_names_to_wrap=["LlamaDecoderLayer"], use_orig_params=True)
    if version == 2:  # FSDP2 has no sync_module_states; the plugin accepts False for it
        return FullyShardedDataParallelPlugin(cpu_ram_efficient_loading=True, sync_module_states=False, **common)
    plugin = FullyShardedDataParallelPlugin(cpu_ram_efficient_loading=False, sync_module_states=False, **common)
    # What __post_init__ does for cpu_ram_efficient_loading, with the CPU as the device:
    plugin.cpu_ram_efficient_loading = True
    plugin.sync_module_states = True
    plugin.param_init_fn = lambda module: module.to_empty(device=CPU, recurse=False)
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "True"  # what __post_init__ tells transformers
    return plugin


def _accelerate(version, cpu_ram_efficient_loading):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    reference, reference_logits, checkpoint = reference_and_checkpoint()
    environment = {} if cpu_ram_efficient_loading else _launch_environment(version, False)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        with _environment(environment):
            plugin = _plugin(version, cpu_ram_efficient_loading)
            accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
            assert accelerator.distributed_type == DistributedType.MULTI_CPU, accelerator.distributed_type
            accelerator.state.distributed_type = DistributedType.FSDP  # CPU adaptation, see the module doc
            accelerator.state.fsdp_plugin = plugin
            # MULTI_CPU names the device "cpu:0" (torch.cpu.device_count() == 1), which FSDP1 then
            # rejects against its own compute device "cpu" ("Inconsistent compute device and
            # `device_id`"); FSDP2 does not care.  Name the plain CPU, as on GPUs it is "cuda:<rank>".
            accelerator.state.device = CPU
            assert accelerator.device == CPU, accelerator.device

            model = ScaledLlamaForCausalLM.from_pretrained(checkpoint)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
            with h.fsdp1_sync_module_states_on_cpu():
                model, optimizer = accelerator.prepare(model, optimizer)
            report = h.compare(model, reference, reference_logits)
            report["fsdp_version"] = plugin.fsdp_version
            report["cpu_ram_efficient_loading"] = bool(plugin.cpu_ram_efficient_loading)
            report["sync_module_states"] = bool(plugin.sync_module_states)
            return report
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


FLOWS = {
    "accelerate_fsdp1": lambda: _accelerate(1, False),
    "accelerate_fsdp1_cpu_ram_efficient_loading": lambda: _accelerate(1, True),
    "accelerate_fsdp2": lambda: _accelerate(2, False),
    "accelerate_fsdp2_cpu_ram_efficient_loading": lambda: _accelerate(2, True),
}

if __name__ == "__main__":
    h.main(FLOWS, __doc__)
