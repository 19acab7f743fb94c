"""The timm sweep: every timm architecture within a size limit, default arguments, nothing shrunk.

For each name in ``timm.list_models()`` (one per model entrypoint, no pretrained tag) whose default
build has at most :data:`MAX_PARAMETERS` parameters: ``timm.create_model(name, pretrained=False)``
through every flow of the harness and timm's own meta path (``timm.create_model(name,
device="meta")`` -> ``to_empty`` -> load).  Outputs are compared on a generic image
(``resolve_data_config``'s input size, batch 1).  A model whose normal build holds nothing a
checkpoint lacks runs :data:`QUICK_FLOWS` only (tensors and state dict, no forward), to keep the sweep
within hours on 2 cores.

timm's own manual fix is measured beside it: the same ``device="meta"`` path followed by
``timm.models.reinit_non_persistent_buffers(model)``, which calls ``init_non_persistent_buffers()``
on every module that defines it (``create_model`` does not call it).  Cases are grouped by timm's
model modules (``timm.models.<family>``), interleaved so that a partial run covers every family.

    python -m sweeps.timm [--json out.json] [--group swin_transformer] [--shard K/N] [name ...]   # from tests/

timm needs torchvision, which only installs beside the CUDA torch 2.14 here (README "Compatibility").
"""
import os
import sys
import warnings

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: pretrained=False never downloads

import timm
import timm.data
from timm.models import _registry

import bufferfix

from . import harness

try:  # timm's own manual fix (recent timm); create_model does not call it
    from timm.models._manipulate import reinit_non_persistent_buffers
except ImportError:  # pragma: no cover - older timm: that flow then raises and is reported as such
    def reinit_non_persistent_buffers(model):
        raise NotImplementedError("timm %s has no reinit_non_persistent_buffers" % timm.__version__)

MAX_PARAMETERS = 60_000_000  # default build; bigger ones are skipped, not shrunk
TIME_LIMIT_S = 600  # per architecture, everything included
TIMM_META = "timm create_model(device='meta')"
TIMM_REINIT = "timm device='meta' + reinit_non_persistent_buffers"  # timm's own manual fix
QUICK_FLOWS = ["torch.device('meta')", TIMM_META]


def architectures():
    """{name: family} for every model entrypoint timm registers (``timm.list_models()``)."""
    return {name: family_of(name) for name in timm.list_models()}


def family_of(name):
    return _registry._model_to_module.get(name) or timm.models.model_entrypoint(name).__module__.rpartition(".")[2]


def size_of(name, model_kwargs=None):
    """Parameters of the default build, counted on meta without bufferfix (nothing allocated)."""
    with bufferfix.disabled(), warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = timm.create_model(name, pretrained=False, **(model_kwargs or {}))
    return sum(p.numel() for p in model.parameters())


def timm_meta_flow(name, model_kwargs):
    """timm's own meta build: ``create_model(name, device="meta")`` -> ``to_empty`` -> load."""
    def load(build, reference):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, device="meta", **model_kwargs)
        model.to_empty(device="cpu")
        model.load_state_dict(reference.state_dict())
        return model
    return load


def timm_reinit_flow(name, model_kwargs):
    """The same, then timm's manual fix: ``timm.models.reinit_non_persistent_buffers(model)``."""
    meta = timm_meta_flow(name, model_kwargs)

    def load(build, reference):
        model = meta(build, reference)
        reinit_non_persistent_buffers(model)
        return model
    return load


def generic_input(model):
    """One seeded image batch of the model's default input size (``resolve_data_config``)."""
    size = timm.data.resolve_data_config({}, model=model)["input_size"]
    return dict(images=torch.randn(1, *size, generator=torch.Generator().manual_seed(1)))


def case(name, family=None, model_kwargs=None, max_parameters=MAX_PARAMETERS):
    """The case of timm model ``name``; ``model_kwargs`` go to ``timm.create_model`` (the full sweep
    passes none: default builds; the CI subset makes models small with them)."""
    model_kwargs = model_kwargs or {}
    sized = []

    def build():
        if not sized:
            sized.append(size_of(name, model_kwargs))
        if sized[0] > max_parameters:
            raise harness.Skip("%.1fM parameters, over the %dM limit" % (sized[0] / 1e6, max_parameters // 10**6))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="timm")
            return timm.create_model(name, pretrained=False, **model_kwargs)

    return harness.Case(
        name, build, inputs=generic_input, forward=lambda model, inputs: model(inputs["images"]),
        loaders={TIMM_META: harness.Flow(timm_meta_flow(name, model_kwargs)),
                 TIMM_REINIT: harness.Flow(timm_reinit_flow(name, model_kwargs), fixes=TIMM_META)},
        group=family or family_of(name), quick_flows=QUICK_FLOWS, time_limit_s=TIME_LIMIT_S, memory_limit=None)


def cases():
    return [case(name, family) for name, family in sorted(architectures().items())]


def skip_category(reason):
    if "over the" in reason and "limit" in reason and "parameters" in reason:
        return "over the %dM parameter limit (default build)" % (MAX_PARAMETERS // 10**6)
    if "time limit" in reason:
        return "over the time limit"
    if reason.startswith("cannot build"):
        return "does not build with default arguments"
    if reason.startswith("two seeded"):
        return "two seeded normal builds differ"
    return "other: " + reason[:80]


def extra(results):
    """timm's own fix per family."""
    lines = ["timm's reinit_non_persistent_buffers without bufferfix, per family: exact / broken in %r" % TIMM_META]
    for family in sorted({r.group for r in results}):
        ran = [r for r in results if r.group == family and r.built and TIMM_REINIT in r.without_bufferfix
               and r.problems(TIMM_META, enabled=False)]
        if ran:
            lines.append("  %-28s %d of %d" % (family, sum(1 for r in ran if r.fix_works(TIMM_REINIT)), len(ran)))
    return lines


LIBRARY = harness.Library(
    "timm", cases, lambda: "timm %s, torch %s" % (timm.__version__, torch.__version__),
    skip_category=skip_category, extra=extra,
    quiet=lambda: warnings.filterwarnings("ignore", module="timm"))

if __name__ == "__main__":
    sys.exit(harness.main(LIBRARY))
