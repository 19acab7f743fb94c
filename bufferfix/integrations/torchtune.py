"""torchtune: RoPE modules whose buffers are registered in ``rope_init()``, which returns early on meta.

``Llama3ScaledRoPE`` (llama3_1 / llama3_2 and their LoRA / DoRA builders) registers no ``cache`` /
``theta`` at all when built on meta; torchtune's recipes call ``m.rope_init()`` by hand after
``to_empty``.  This integration patches nothing: it names torchtune's classes with a ``rope_init``
method to the recovery loop (``recompute.expect_buffers``), which adds the buffers their replay has and the
materialised module lacks, registered as the normal build registers them.
"""
from .base import ExpectBuffers, Integration


def rope_module(cls: type) -> bool:
    """A torchtune module class whose buffers come from ``rope_init()``."""
    return cls.__module__.startswith("torchtune.") and callable(getattr(cls, "rope_init", None))


class TorchTune(Integration):
    name = "torchtune"
    target = "torchtune"
    patches = "torchtune RoPE modules (rope_init)"
    declarations = (ExpectBuffers(rope_module),)


INTEGRATION = TorchTune()
