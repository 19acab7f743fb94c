"""accelerate: loading and dispatch of models built with ``init_empty_weights(include_buffers=True)``.

``load_checkpoint_in_model`` only writes what is in the checkpoint and ``dispatch_model``
only moves what exists, so non-persistent buffers born on meta stay on meta and the
model fails later ("Cannot copy out of meta tensor", "... is on the meta device, we need
a value").  Before either runs, bufferfix gives those buffers their values on CPU;
accelerate then moves them like any other buffer.

``from accelerate import dispatch_model`` binds the function in several modules; each
binding that still holds accelerate's original is wrapped, and only those are unwrapped.
"""
from __future__ import annotations

import logging
from typing import Any

from .base import Integration, Wrap, Wrapped, WrapperArgs, WrapperKwargs, await_loading_end, contained, report

logger = logging.getLogger("bufferfix")

def _materialise_meta_buffers_first(wrapped: Wrapped, instance: None, args: WrapperArgs,
                                    kwargs: WrapperKwargs) -> Any:
    from ..mechanism.restore import materialise_meta_buffers

    model = args[0] if args else kwargs.get("model")
    if INTEGRATION.active and model is not None:
        def materialise() -> None:
            report(materialise_meta_buffers(model), ())
            await_loading_end()

        contained(materialise, "materialising meta buffers for accelerate")
    return wrapped(*args, **kwargs)


class Accelerate(Integration):
    name = "accelerate"
    target = "accelerate"
    declarations = (
        Wrap("accelerate.big_modeling", "dispatch_model", _materialise_meta_buffers_first, also_in=("accelerate",)),
        Wrap("accelerate.utils.modeling", "load_checkpoint_in_model", _materialise_meta_buffers_first,
             also_in=("accelerate.utils", "accelerate.big_modeling", "accelerate")),
    )


INTEGRATION = Accelerate()
