"""A transformers model with a non-persistent buffer that transformers itself does not refill.

A Llama plus one custom module holding a per-token logit scale, as remote-code / custom models
have.  transformers 5 materialises every non-persistent buffer with ``empty_like`` (``zeros_like``
on ranks > 0 under accelerate's cpu_ram_efficient_loading) and only refills those its
``_init_weights`` knows (rotary ``inv_freq``), so this one holds garbage without bufferfix
(transformers issue 48892).  The checkpoint is saved once per job, by rank 0, under the job's
--out folder.
"""
import os

import _harness as h
import torch
import torch.distributed as dist
import transformers
from torch import nn


class LogitScale(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        scale = 1.0 + torch.arange(vocab_size, dtype=torch.float32) / vocab_size
        self.register_buffer("scale", scale, persistent=False)

    def forward(self, logits):
        return logits * self.scale


class ScaledLlamaForCausalLM(transformers.LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self.logit_scale = LogitScale(config.vocab_size)
        self.post_init()

    def forward(self, input_ids=None, **kwargs):
        output = super().forward(input_ids=input_ids, **kwargs)
        output.logits = self.logit_scale(output.logits)
        return output


_checkpoint = None


def reference_and_checkpoint():
    """The normally built reference (seed 0, on every rank), its logits, and its save_pretrained folder."""
    global _checkpoint
    torch.manual_seed(0)
    reference = ScaledLlamaForCausalLM(h.llama_config()).eval()
    if _checkpoint is None:
        path = os.path.join(h.OUT, "scaled_llama_checkpoint")
        if h.rank() == 0:
            reference.save_pretrained(path)
        dist.barrier()
        _checkpoint = path
    return reference, h.logits_of(reference), _checkpoint
