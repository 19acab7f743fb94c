"""The doctor's report: :func:`bufferfix.tools.check.measure` with bufferfix here and without it in a
fresh ``BUFFERFIX_DISABLE=1`` interpreter, and :func:`bufferfix.explain` on a meta build, put together as
one JSON-able dict, and that dict as text.

Every classification comes from :class:`bufferfix.Recovery` values and from bit-for-bit
comparisons; the only words taken from bufferfix are :func:`bufferfix.reporting.describe`'s,
shown as they are.
"""
from __future__ import annotations

from collections.abc import Callable, Set
from typing import TYPE_CHECKING, Any

from .. import unpatched
from ..check import FROM_PRETRAINED, NotAModule, measure
from ..compare import non_persistent_buffers, unsaved_tensors
from ..errors import one_line
from .targets import Target, TargetError, resolve, transformers_quietly

if TYPE_CHECKING:
    import argparse

    import torch

    from bufferfix.recovery import Recovery

Json = dict[str, Any]  # a JSON object (what --json prints): its values are of every kind
UNTRACKED = "untracked"  # a reason of the doctor's own: bufferfix.explain does not list the tensor


def child_arguments(arguments: argparse.Namespace) -> list[str]:
    """The command line of the doctor's ``BUFFERFIX_DISABLE=1`` child (``--flows-only``)."""
    command = ["--flows-only", arguments.target]
    if arguments.model_class:
        command += ["--class", arguments.model_class]
    if arguments.trust_remote_code:
        command.append("--trust-remote-code")
    return command


def measure_target(target: Target, patched: bool, built: Callable[[], object] = lambda: None) -> Json:
    """:func:`~bufferfix.tools.check.measure` on a doctor target, as JSON: ``{"buffers": [names in the normal
    build], "random": [names two normal builds with different seeds disagree on], "flows": {flow:
    {"not_checked", "error", "broken", "warnings"}}}``.  :class:`TargetError` when the normal build fails."""
    import torch

    from bufferfix import reporting

    if target.tiny:
        torch.set_num_threads(1)  # faster for tiny tensors
    if target.model_class is not None:
        transformers_quietly()  # no progress bars or loading reports in the middle of ours
    normal_build: list[bool] = []

    def on_built(model: torch.nn.Module) -> None:
        normal_build.append(True)
        built()

    try:
        found = measure(target.build, patched=patched, model_class=target.model_class,
                        pretrained_dir=target.pretrained_dir, find_random=True, built=on_built)
    except NotAModule as error:
        raise TargetError("%s: %s" % (target.text, error)) from None
    except Exception as error:  # the normal build's, or ours (re-raised)
        if normal_build:  # not the build: ours
            raise
        raise TargetError("%s: building it raised %s" % (target.text, one_line(error))) from None
    flows = {}
    for name, result in found.flows.items():
        warnings = [{"name": recovery.name, "reason": recovery.reason.name.lower() if recovery.reason else None,
                     "origin": recovery.origin, "description": reporting.describe(recovery)}
                    for recovery in result.unrecoverable]
        warnings += [{"name": None, "reason": None, "origin": None, "description": text}
                     for text in result.other_warnings]
        flows[name] = {"not_checked": result.not_checked, "error": result.error, "broken": result.differing,
                       "warnings": warnings}
    return {"buffers": found.tensors, "random": found.random, "flows": flows}


def recoveries(target: Target) -> tuple[dict[str, tuple[torch.Tensor, Recovery | None]] | None, str | None]:
    """``({name: (tensor, Recovery or None)}, None)`` for a build under ``torch.device("meta")`` (the
    hardest case: nothing real ever existed), from :func:`bufferfix.explain`; ``None`` for a tensor
    it does not list.  ``(None, error)`` when the model does not build on meta."""
    import torch

    import bufferfix
    from bufferfix.recovery import Recovery, Source

    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            torch.manual_seed(0)
            model = target.build()
    except Exception as error:  # noqa: BLE001 - user code
        return None, one_line(error)
    tensors = unsaved_tensors(model)
    explained = {recovery.name: recovery for recovery in bufferfix.explain(model)}
    by_tensor = {id(tensors[name]): recovery for name, recovery in explained.items() if name in tensors}
    found: dict[str, Recovery | None] = {}
    for name, tensor in tensors.items():  # a shared tensor may be explained under another of its names
        found[name] = explained.get(name) or by_tensor.get(id(tensor))
        if found[name] is None and not tensor.is_meta:  # real even on meta: nothing to recover
            owner = type(model.get_submodule(name.rpartition(".")[0])).__qualname__
            kind = "buffer" if name in non_persistent_buffers(model) else "attribute"
            found[name] = Recovery(name, owner, kind, Source.KEPT)
    return {name: (tensors[name], recovery) for name, recovery in found.items()}, None


def _entry(name: str, tensor: torch.Tensor, recovery: Recovery | None) -> Json:
    """One buffer of the report, from its :class:`~bufferfix.Recovery` (None: not explained)."""
    from bufferfix import reporting

    entry = {"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).replace("torch.", "")}
    if recovery is None:
        return dict(entry, module_class="?", kind="?", recovery="cannot", origin=None, reason=UNTRACKED,
                    description="bufferfix does not track it")
    return dict(entry, module_class=recovery.owner, kind=recovery.kind,
                recovery=recovery.source.value if recovery.source is not None else "cannot", origin=recovery.origin,
                reason=recovery.reason.name.lower() if recovery.reason else None,
                description=reporting.describe(recovery))


def _verdict(result: Json, other: Json | None, random: Set[str]) -> tuple[str, str | None]:
    """``(verdict, why not checked)``."""
    if result["not_checked"]:
        return "not checked", result["not_checked"]
    if result["error"] is not None:
        if other is not None and other["error"] is not None:
            return "not checked", "it raises with and without bufferfix: %s" % result["error"]
        return "wrong", None
    if not result["broken"]:
        return "ok", None
    if set(result["broken"]) <= random:
        return "random buffers differ", None  # no build reproduces another build's random values
    return "wrong", None


def diagnose(arguments: argparse.Namespace, progress: Callable[[str], None] = lambda text: None) -> Json:
    """Everything the doctor finds, as one JSON-able dict."""
    target = resolve(arguments.target, arguments.model_class, arguments.trust_remote_code)
    children = []  # once the target builds: each flow without bufferfix, meanwhile, in a fresh interpreter

    def built() -> None:
        children.append(unpatched.Child("bufferfix.tools.doctor", child_arguments(arguments)))
        progress("built %s; running it through each flow with bufferfix..." % target.description)

    try:
        with_fix = measure_target(target, True, built)
        progress("asking bufferfix how it would recover each buffer of a build on meta...")
        explained, meta_error = recoveries(target)
    except BaseException:
        for child in children:
            child.kill()
        raise
    [child] = children
    progress("waiting for the same flows without bufferfix (BUFFERFIX_DISABLE=1, fresh interpreter)...")
    try:
        without, without_error = child.result(), None
    except unpatched.ChildFailed as error:
        without, without_error = None, str(error)
    random = set(with_fix["random"])
    if explained is None:
        assert meta_error is not None  # recoveries() gives no tensors only with the error
        entries = [{"name": name, "module_class": "?", "kind": "?", "shape": None, "dtype": None,
                    "recovery": "unknown", "origin": None, "reason": None,
                    "description": "the model does not build under torch.device('meta'): " + meta_error}
                   for name in with_fix["buffers"]]
    else:
        entries = [_entry(name, tensor, recovery) for name, (tensor, recovery) in explained.items()]
    from_pretrained_without = (without or {}).get("flows", {}).get(FROM_PRETRAINED)
    for entry in entries:
        entry["random"] = entry["name"] in random  # two normal builds (different seeds) differ
        entry["transformers_init"] = None  # does from_pretrained give it back even without bufferfix?
        if (from_pretrained_without is not None and from_pretrained_without["error"] is None
                and not from_pretrained_without["not_checked"]):
            entry["transformers_init"] = entry["name"] not in from_pretrained_without["broken"]
    flows_report, not_checked = {}, {}
    for name, result in with_fix["flows"].items():
        other = (without or {}).get("flows", {}).get(name)
        verdict, why = _verdict(result, other, random)
        flows_report[name] = {"with_bufferfix": result, "without_bufferfix": other, "verdict": verdict}
        if why:
            not_checked[name] = why
    unrecoverable = [entry["name"] for entry in entries if entry["recovery"] == "cannot"]
    wrong = [name for name, report in flows_report.items() if report["verdict"] == "wrong"]
    return {
        "target": arguments.target, "model": target.description, "buffers": entries,
        "meta_build_error": meta_error, "flows": flows_report, "not_checked": not_checked,
        "without_bufferfix_error": without_error, "unrecoverable": unrecoverable, "wrong_with_bufferfix": wrong,
        "ok": not unrecoverable and not wrong,
    }


# --------------------------------------------------------------------------- as text

def _class_name(origin: str | None) -> str:
    """``"package.module.Class"`` -> ``"Class"``."""
    return origin.rpartition(".")[2] if origin else ""


def recovery_cell(entry: Json) -> str:
    """The table's words for one buffer, from its values: ``replay of LlamaRotaryEmbedding(...)``,
    ``CANNOT: random``..."""
    origin = _class_name(entry["origin"])
    if entry["recovery"] == "cannot":
        from bufferfix.recovery import Reason

        member = Reason.__members__.get((entry["reason"] or "").upper())
        reason = member.value if member else entry["reason"] or "?"
        return "CANNOT: %s%s" % (reason, " (%s)" % origin if origin else "")
    if entry["recovery"] == "replay" and origin:
        return "replay of %s(...)" % origin
    if entry["recovery"] == "recompute function" and origin:
        return "recompute function of %s" % origin
    return entry["recovery"]


def _flow_cell(result: Json | None, total: int, enabled: bool, random: Set[str]) -> str:
    if result is None:
        return "not run"
    if result["not_checked"]:
        return "not checked"
    if result["error"] is not None:
        return "raised (below)"
    if not total:
        return "ok (no buffers)"
    if not result["broken"]:
        return "ok: %d/%d identical" % (total, total) if enabled else "ok: %d/%d identical (unaffected)" % (total, total)
    shown = "" if len(result["broken"]) == total else " (%s%s)" % (", ".join(result["broken"][:2]),
                                                                   ", ..." if len(result["broken"]) > 2 else "")
    if enabled and set(result["broken"]) <= random:
        return "random: %d/%d differ%s" % (len(result["broken"]), total, shown)
    return "%s: %d/%d differ%s" % ("WRONG" if enabled else "broken", len(result["broken"]), total, shown)


def _buffer_table(entries: list[Json]) -> list[str]:
    transformers_column = any(entry["transformers_init"] is not None for entry in entries)
    rows = [("name", "module", "shape", "dtype", "recovery") + (("transformers init",) if transformers_column else ())]
    for entry in entries:
        row: tuple[str, ...] = (entry["name"] + (" (attribute)" if entry["kind"] == "attribute" else "")
               + (" (random)" if entry["random"] else ""), entry["module_class"],
               str(tuple(entry["shape"])) if entry["shape"] is not None else "?",
               entry["dtype"] or "?", recovery_cell(entry))
        if transformers_column:
            row += ({True: "yes", False: "no", None: "?"}[entry["transformers_init"]],)
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows]
    if transformers_column:
        lines.append("  (transformers init: does from_pretrained get it right even without bufferfix? Measured;\n"
                     "   transformers 5 recomputes the buffers its models' _init_weights know)")
    return lines


def format_report(report: Json) -> str:
    lines = ["bufferfix doctor: %s (%s)" % (report["target"], report["model"]), ""]
    entries = report["buffers"]
    if not entries:
        lines.append("No non-persistent buffers: nothing for bufferfix to do; every flow only needs the checkpoint.")
    else:
        lines.append("Non-persistent buffers (%d); recovery as bufferfix would do it for a model built under "
                     "torch.device('meta'):" % len(entries))
        lines += _buffer_table(entries)
        for entry in entries:
            if entry["recovery"] == "cannot":
                lines.append("  %s: %s" % (entry["name"], entry["description"]))
    if report["meta_build_error"]:
        lines.append("  The model does not build under torch.device('meta'): %s" % report["meta_build_error"])
    total = len({entry["name"] for entry in entries})
    random = {entry["name"] for entry in entries if entry["random"]}
    lines += ["", "Flows, buffers compared bit for bit with a normal build (value, dtype, device):"]
    width = max(len(name) for name in report["flows"]) + 1
    cells = {name: (_flow_cell(flow["with_bufferfix"], total, True, random),
                    _flow_cell(flow["without_bufferfix"], total, False, random))
             for name, flow in report["flows"].items()}
    middle = max([len("with bufferfix")] + [len(cell[0]) for cell in cells.values()]) + 1
    lines.append("  %-*s %-*s %s" % (width, "flow", middle, "with bufferfix", "without bufferfix (BUFFERFIX_DISABLE=1)"))
    notes = []
    for name, flow in report["flows"].items():
        lines.append("  %-*s %-*s %s" % (width, name, middle, cells[name][0], cells[name][1]))
        for warning in flow["with_bufferfix"]["warnings"]:
            lines.append("  %-*s   bufferfix warned: %s" % (width, "", warning["description"]))
        for column, result in (("with bufferfix", flow["with_bufferfix"]), ("without", flow["without_bufferfix"])):
            if result is not None and result["error"] is not None and name not in report["not_checked"]:
                notes.append("  %s, %s: raised %s" % (name, column, result["error"]))
    lines += notes
    if random:
        lines.append("  (random: %s: two normal builds with different seeds differ there; no flow can give back a "
                     "particular build's values unless its real tensor survives)" % ", ".join(sorted(random)))
    if report["without_bufferfix_error"]:
        lines.append("  (without bufferfix: %s)" % report["without_bufferfix_error"])
    lines.append("")
    checked = len(report["flows"]) - len(report["not_checked"])
    if report["ok"]:
        if not entries:
            lines.append("OK: nothing to recover.")
        else:
            lines.append("OK: bufferfix recovers every non-persistent buffer in %s."
                         % ("each of the %d flows checked" % checked if report["not_checked"] else "every flow"))
    else:
        if report["unrecoverable"]:
            lines.append("PROBLEM: bufferfix cannot recover %s; register a recompute function "
                         "(bufferfix.register_recompute(ModuleClass, fn)) or build this model normally."
                         % ", ".join(report["unrecoverable"]))
        if report["wrong_with_bufferfix"]:
            lines.append("PROBLEM: wrong even with bufferfix: %s." % ", ".join(report["wrong_with_bufferfix"]))
    for name, why in report["not_checked"].items():
        lines.append("NOT CHECKED: %s: %s" % (name, why))
    return "\n".join(lines)
