"""transformers 5's own distributed loading: ``from_pretrained(..., distributed_config=DistributedConfig(...))``
with tensor parallelism (``tp_plan="auto"``) and with its native FSDP2 (``fsdp_size=2``), on CPU/gloo.

The model is :class:`_custom_model.ScaledLlamaForCausalLM` (its custom non-persistent buffer is
garbage without bufferfix).  Tensor parallelism sums partial products across ranks (row-parallel
``o_proj`` / ``down_proj`` outputs are all-reduced), so its logits differ from one process's in the
last bits: the report carries the maximum difference, and the test bounds it (see
``TP_LOGITS_ATOL`` in ``tests/test_distributed.py``).
"""
import warnings

import _harness as h  # first: imports bufferfix before torch
import transformers
from _custom_model import ScaledLlamaForCausalLM, reference_and_checkpoint


def _load(**distributed):
    try:
        from transformers import DistributedConfig
    except ImportError:  # transformers 4: only tensor parallelism, as from_pretrained(tp_plan=...)
        DistributedConfig = None
        if set(distributed) != {"tp_plan"}:
            return {"unsupported": "transformers %s has no DistributedConfig" % transformers.__version__}

    reference, reference_logits, checkpoint = reference_and_checkpoint()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # 5.x deprecates the tp_plan keyword
        if DistributedConfig is None:
            model = ScaledLlamaForCausalLM.from_pretrained(checkpoint, **distributed)
        else:
            model = ScaledLlamaForCausalLM.from_pretrained(checkpoint,
                                                           distributed_config=DistributedConfig(**distributed))
    report = h.compare(model, reference, reference_logits)
    report["sharded_weight_type"] = type(model.model.layers[0].self_attn.q_proj.weight).__name__
    return report


FLOWS = {
    "transformers_tp_plan_auto": lambda: _load(tp_plan="auto"),
    "transformers_fsdp2": lambda: _load(fsdp_size=2),
}

if __name__ == "__main__":
    h.main(FLOWS, __doc__)
