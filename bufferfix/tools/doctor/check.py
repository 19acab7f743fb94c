"""What the doctor measures, in this interpreter.

- :func:`check_flows`: every flow of :data:`bufferfix.flows.FLOWS` (plus ``save_pretrained`` ->
  ``from_pretrained`` for transformers models), each model's non-persistent buffers and tensor
  attributes compared bit for bit with a normal build (with bufferfix here; without it in the
  doctor's ``BUFFERFIX_DISABLE=1`` child, see :mod:`bufferfix.tools.unpatched`);
- :func:`recoveries`: how bufferfix would recover each of them for a build on meta, as
  :class:`bufferfix.Recovery` values (:func:`bufferfix.explain`).

Uninitialised memory is poisoned (NaN / max-int) while flows run, so a lost buffer never matches by luck.
"""
import sys
import tempfile
import warnings

from ..compare import differing, non_persistent_buffers, unsaved_tensors
from ..errors import one_line
from .targets import TargetError, transformers_quietly

FROM_PRETRAINED = "from_pretrained"


def fresh_build(build, seed=0):
    """A build with the RNG in the same state every time, so that a random buffer is the same in the
    reference and in a flow's build (the ``.to('meta')`` flow can then get it back from a snapshot)."""
    import torch

    torch.manual_seed(seed)
    return build()


def _pretrained_class(target, reference):
    """The transformers class whose ``from_pretrained`` applies, or None (not a transformers model)."""
    if target.model_class is not None:
        return target.model_class
    transformers = sys.modules.get("transformers")
    if transformers is not None and isinstance(reference, transformers.PreTrainedModel):
        return type(reference)
    return None


def _from_pretrained(target, model_class, reference):
    import torch

    if target.pretrained_dir:
        return model_class.from_pretrained(target.pretrained_dir, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        return model_class.from_pretrained(directory, dtype=torch.float32)


def warned(caught):
    """The bufferfix warnings among ``caught``, one JSON-able dict per buffer they name (from the
    warnings' :class:`~bufferfix.Recovery` values, never from their text)."""
    import bufferfix
    from bufferfix import reporting

    found = []
    for warning in caught:
        if not issubclass(warning.category, bufferfix.BufferFixWarning):
            continue
        recoveries = getattr(warning.message, "recoveries", ())
        for recovery in recoveries:
            found.append({"name": recovery.name, "reason": recovery.reason.name.lower() if recovery.reason else None,
                          "origin": recovery.origin, "description": reporting.describe(recovery)})
        if not recoveries:  # a warning about no particular buffer: shown as it is
            found.append({"name": None, "reason": None, "origin": None,
                          "description": str(warning.message).strip().splitlines()[0]})
    unique = {(entry["name"], entry["reason"], entry["description"]): entry for entry in found}
    return sorted(unique.values(), key=lambda entry: (entry["name"] or "", entry["description"]))


def check_flows(target, progress=lambda text: None, built=lambda: None):
    """Run every flow on ``target`` in this interpreter (bufferfix on or off, whatever it is here).

    Returns ``{"buffers": [names in the normal build], "random": [names that differ between two normal
    builds], "flows": {flow: {"error", "broken", "warnings"}}}``; raises :class:`TargetError` when the
    normal build fails.  ``built()`` is called once the normal build has worked."""
    import torch

    from bufferfix import flows

    if target.tiny:
        torch.set_num_threads(1)
    try:
        reference = fresh_build(target.build)
    except Exception as error:  # noqa: BLE001 - user code
        raise TargetError("%s: building it raised %s" % (target.text, one_line(error))) from None
    if not isinstance(reference, torch.nn.Module):
        raise TargetError("%s: built a %s, not a torch.nn.Module" % (target.text, type(reference).__name__))
    built()
    progress("built %s; running it through each flow with bufferfix..." % target.description)
    expected = unsaved_tensors(reference)
    random = differing(unsaved_tensors(fresh_build(target.build, seed=1)), expected)
    state_dict = reference.state_dict()
    runs = {name: (lambda flow=flow: flow(lambda: fresh_build(target.build), state_dict))
            for name, flow in flows.FLOWS.items()}
    model_class = _pretrained_class(target, reference)
    if model_class is not None:
        transformers_quietly()  # no progress bars or loading reports in the middle of ours
        runs[FROM_PRETRAINED] = lambda: _from_pretrained(target, model_class, reference)
    results = {}
    with flows.uninitialised_memory_is_poisoned():
        for name, run in runs.items():
            result = results[name] = {"error": None, "broken": [], "warnings": []}
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    model = run()
                except Exception as error:  # noqa: BLE001 - recorded
                    result["error"] = one_line(error)
                    model = None
            result["warnings"] = warned(caught)
            if model is not None:
                result["broken"] = differing(unsaved_tensors(model), expected)
                del model
    return {"buffers": list(expected), "random": random, "flows": results}


def recoveries(target):
    """``({name: (tensor, Recovery or None)}, None)`` for a build under ``torch.device("meta")`` (the
    hardest case: nothing real ever existed), from :func:`bufferfix.explain`; ``None`` for a tensor
    it does not list.  ``(None, error)`` when the model does not build on meta."""
    import torch

    import bufferfix
    from bufferfix.recovery import Recovery, Source

    try:
        with torch.device("meta"):
            model = fresh_build(target.build)
    except Exception as error:  # noqa: BLE001 - user code
        return None, one_line(error)
    tensors = unsaved_tensors(model)
    explained = {recovery.name: recovery for recovery in bufferfix.explain(model)}
    by_tensor = {id(tensors[name]): recovery for name, recovery in explained.items() if name in tensors}
    found = {}
    for name, tensor in tensors.items():  # a shared tensor may be explained under another of its names
        found[name] = explained.get(name) or by_tensor.get(id(tensor))
        if found[name] is None and not tensor.is_meta:  # real even on meta: nothing to recover
            owner = type(model.get_submodule(name.rpartition(".")[0])).__qualname__
            kind = "buffer" if name in non_persistent_buffers(model) else "attribute"
            found[name] = Recovery(name, owner, kind, Source.KEPT)
    return {name: (tensors[name], recovery) for name, recovery in found.items()}, None
