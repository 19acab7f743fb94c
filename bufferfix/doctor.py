"""``python -m bufferfix.doctor TARGET``: which non-persistent buffers a model has, how bufferfix
recovers each one, and whether every meta-device flow really gives them back.

TARGET is one of

* a local model directory written by ``save_pretrained`` (its ``config.json`` names the class);
* a transformers model type (``llama``, ``bert``, ``gpt2``...) or model class name
  (``LlamaForCausalLM``): its default config, shrunk to a tiny size, is built;
* ``module:callable`` (or ``path/to/file.py:callable``): ``callable()`` returns the ``nn.Module``.

The doctor

1. builds the model under ``torch.device("meta")`` and asks bufferfix, without changing anything,
   how it would recover each non-persistent buffer (constructor replay, a registered recompute
   function, or why it cannot);
2. runs every flow of :data:`bufferfix.flows.FLOWS` (plus ``save_pretrained`` ->
   ``from_pretrained`` for transformers models) and compares the buffers bit for bit (value,
   dtype, device) with a normal build: with bufferfix in this interpreter, and without it in a
   fresh interpreter started with ``BUFFERFIX_DISABLE=1`` (genuinely unpatched).

Uninitialised memory is poisoned (NaN / max-int) in both, so a lost buffer can never match by luck.
Exit status: 0 all good; 1 a buffer bufferfix cannot recover, or a flow that is wrong with
bufferfix; 2 a bad target (one line on stderr).
"""
import argparse
import copy
import difflib
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings

FROM_PRETRAINED = "from_pretrained"
MAX_PARAMETERS = 50_000_000  # a tiny config still bigger than this is refused
_EXAMPLES = "e.g. llama, bert, gpt2"


class TargetError(Exception):
    """The target does not exist or does not build: exit 2 with this one-line message."""


def _one_line(error):
    text = str(error).strip()
    text = text.splitlines()[0] if text else ""
    if len(text) > 300:
        text = text[:297] + "..."
    return "%s: %s" % (type(error).__name__, text) if text else type(error).__name__


# =========================================================================== targets

class Target:
    """What to build: ``build()`` (a normal build, or a meta one under ``torch.device("meta")``)."""

    def __init__(self, text, description, build, model_class=None, pretrained_dir=None, tiny=False):
        self.text = text
        self.tiny = tiny  # a tiny config: torch runs single-threaded (faster for tiny tensors)
        self.description = description
        self.build = build
        self.model_class = model_class  # a transformers PreTrainedModel class: from_pretrained applies
        self.pretrained_dir = pretrained_dir  # load from here (a local model directory), else save a normal build


def resolve(text, class_name=None, trust_remote_code=False):
    """TARGET string -> :class:`Target`, or :class:`TargetError`."""
    if os.path.isdir(text):
        return _directory_target(text, class_name, trust_remote_code)
    module, colon, attribute = text.rpartition(":")
    if colon and module and attribute and not os.path.exists(text):
        return _callable_target(text, module, attribute)
    if os.sep in text or "/" in text or text.startswith((".", "~")) or text.endswith(".py"):
        raise TargetError("%s: no such directory" % text)
    return _type_target(text, class_name)


def _callable_target(text, module_name, attribute):
    if module_name.endswith(".py"):
        if not os.path.isfile(module_name):
            raise TargetError("%s: no such file" % module_name)
        spec = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as error:  # noqa: BLE001 - user code
            raise TargetError("%s: running it raised %s" % (module_name, _one_line(error))) from None
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name and (module_name == error.name or module_name.startswith(error.name + ".")):
                raise TargetError("%s: no module named %r (is it on PYTHONPATH?)" % (text, error.name)) from None
            raise TargetError("%s: importing %s raised %s" % (text, module_name, _one_line(error))) from None
        except Exception as error:  # noqa: BLE001 - user code
            raise TargetError("%s: importing %s raised %s" % (text, module_name, _one_line(error))) from None
    value = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise TargetError("%s: %s has no attribute %r" % (text, module_name, part)) from None
    if not callable(value):
        raise TargetError("%s: %s is not callable" % (text, attribute))
    return Target(text, "%s() from %s" % (attribute, module_name), value)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise TargetError("this target needs transformers: pip install transformers") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def _model_class(transformers, name, where):
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise TargetError("%s: %r is not a transformers model class" % (where, name))
    return cls


def _directory_target(directory, class_name, trust_remote_code):
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise TargetError("%s: a directory, but not a saved transformers model (no config.json); for any other "
                          "model pass module:callable" % directory)
    try:
        with open(os.path.join(directory, "config.json")) as handle:
            custom = "auto_map" in json.load(handle)
    except (OSError, ValueError) as error:
        raise TargetError("%s: cannot read its config.json: %s" % (directory, _one_line(error))) from None
    if custom and not trust_remote_code:
        raise TargetError("%s: its config names custom code (auto_map); pass --trust-remote-code to run it" % directory)
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except Exception as error:  # noqa: BLE001
        raise TargetError("%s: cannot read its config: %s" % (directory, _one_line(error))) from None
    if class_name:
        cls = _model_class(transformers, class_name, directory)
    else:
        architectures = getattr(config, "architectures", None) or []
        cls = getattr(transformers, architectures[0], None) if architectures else None
        auto_map = getattr(config, "auto_map", None) or {}
        if cls is None and architectures and auto_map:
            if not trust_remote_code:
                raise TargetError("%s: its model %s is custom code; pass --trust-remote-code to run it"
                                  % (directory, architectures[0]))
            from transformers.dynamic_module_utils import get_class_from_dynamic_module

            reference = next((value for key, value in auto_map.items() if key.startswith("AutoModel")
                              and str(value).endswith("." + architectures[0])), None)
            reference = reference or next((value for key, value in auto_map.items() if key.startswith("AutoModel")),
                                          None)
            if reference is None:
                raise TargetError("%s: its config's auto_map names no model class" % directory)
            try:
                cls = get_class_from_dynamic_module(reference, directory)
            except Exception as error:  # noqa: BLE001
                raise TargetError("%s: cannot load its custom code: %s" % (directory, _one_line(error))) from None
        if cls is None:
            try:
                cls = transformers.AutoModel._model_mapping[type(config)]
            except Exception:  # noqa: BLE001
                raise TargetError("%s: cannot tell which model class to build (architectures: %s); pass --class"
                                  % (directory, architectures or "none")) from None
    weights = any(name.endswith((".safetensors", ".bin", ".index.json")) for name in os.listdir(directory))
    return Target(directory, "%s from %s" % (cls.__name__, directory), lambda: cls(copy.deepcopy(config)), cls,
                  pretrained_dir=directory if weights else None)  # no weights there: from_pretrained a normal build


def _type_target(name, class_name):
    transformers = _transformers()
    from transformers.models.auto import configuration_auto, modeling_auto

    model_type, cls = name, None
    as_class = getattr(transformers, name, None)
    if isinstance(as_class, type) and issubclass(as_class, transformers.PreTrainedModel):
        cls, model_type = as_class, getattr(as_class.config_class, "model_type", None)
    elif name not in configuration_auto.CONFIG_MAPPING_NAMES and name.lower() in configuration_auto.CONFIG_MAPPING_NAMES:
        model_type = name.lower()
    if model_type not in configuration_auto.CONFIG_MAPPING_NAMES:
        close = difflib.get_close_matches(name.lower(), configuration_auto.CONFIG_MAPPING_NAMES, n=3)
        raise TargetError("%s: unknown target: not a directory, not module:callable, and not a transformers model "
                          "type (%s)" % (name, "did you mean %s?" % " / ".join(close) if close else _EXAMPLES))
    if class_name:
        cls = _model_class(transformers, class_name, name)
    if cls is None:
        causal = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        masked = modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES.get(model_type)
        base = modeling_auto.MODEL_MAPPING_NAMES.get(model_type)
        try:
            encoder_decoder = bool(configuration_auto.CONFIG_MAPPING[model_type]().is_encoder_decoder)
        except Exception:  # noqa: BLE001 - a config that does not build by default fails later, clearly
            encoder_decoder = False
        # decoder-only LMs: the causal LM; encoders and encoder-decoders: the base model
        choice = causal if causal and not masked and not encoder_decoder else base or causal
        if isinstance(choice, (list, tuple)):
            choice = choice[0]
        if not choice:
            raise TargetError("%s: transformers has no base or causal-LM model for this type; pass --class" % name)
        cls = _model_class(transformers, choice, name)
    config, level = _tiny_config(model_type, cls)
    return Target(name, "%s, %s config" % (cls.__name__, level), lambda: cls(copy.deepcopy(config)), cls, tiny=True)


# --------------------------------------------------------------------------- tiny configs

_LAYERS, _HIDDEN, _FFN, _HEADS, _KV_HEADS, _HEAD_DIM, _VOCAB, _POSITIONS = 2, 64, 128, 4, 2, 16, 128, 128
_LAYER_KEYS = {"num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers",
               "num_decoder_layers", "num_encoder_layers"}
_HEAD_KEYS = {"num_attention_heads", "n_head", "n_heads", "encoder_attention_heads", "decoder_attention_heads",
              "num_heads"}
_KV_HEAD_KEYS = {"num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num"}
_WIDTH_KEYS = {"hidden_size", "d_model", "n_embd", "n_embed", "embed_dim", "dim", "embedding_size"}
_FFN_KEYS = {"intermediate_size", "ffn_dim", "d_ff", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim"}
_POSITION_KEYS = {"max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"}
_TOKEN_ID = re.compile(r"(^|_)token_(id|index)$")
_LEVELS = [("tiny", {"layers", "widths", "vocab", "positions"}), ("reduced (fewer layers, small vocab)",
                                                                  {"layers", "vocab", "positions"})]


def _smaller(value, limit):
    return isinstance(value, int) and not isinstance(value, bool) and value > limit


def _shrink(d, what, token_ids):
    if "layers" in what:
        for key in _LAYER_KEYS & d.keys():
            old = d[key]
            if _smaller(old, _LAYERS):
                d[key] = _LAYERS
                for other, value in d.items():  # per-layer lists (layer_types...) follow
                    if "layer" in other and isinstance(value, (list, tuple)) and len(value) == old:
                        d[other] = type(value)(value[:_LAYERS])
    if "widths" in what:
        for key, value in list(d.items()):
            limit = (_HIDDEN if key in _WIDTH_KEYS else _FFN if key in _FFN_KEYS else _HEADS if key in _HEAD_KEYS
                     else _KV_HEADS if key in _KV_HEAD_KEYS else _HEAD_DIM if key in ("head_dim", "d_kv") else None)
            if limit is not None and _smaller(value, limit):
                d[key] = limit
    if "vocab" in what:
        for key, value in list(d.items()):
            if key.endswith("vocab_size") and key != "type_vocab_size" and _smaller(value, 1000):
                d[key] = _VOCAB
            elif _TOKEN_ID.search(key) and _smaller(value, _VOCAB - 1):
                d[key] = token_ids.setdefault(value, _VOCAB - 1 - len(token_ids))
    if "positions" in what:
        for key in _POSITION_KEYS & d.keys():
            if _smaller(d[key], _POSITIONS):
                d[key] = _POSITIONS
    for value in d.values():
        if isinstance(value, dict) and "model_type" in value:  # a sub-config
            _shrink(value, what, token_ids)


def _tiny_config(model_type, cls):
    import torch
    from transformers.models.auto import configuration_auto

    problems = []
    for level, what in _LEVELS:
        try:
            d = configuration_auto.CONFIG_MAPPING[model_type]().to_dict()
            _shrink(d, what, {})
            for key in ("transformers_version", "architectures", "_name_or_path"):
                d.pop(key, None)
            config = cls.config_class.from_dict(d)
            with torch.device("meta"):  # size it without touching memory
                parameters = sum(p.numel() for p in cls(copy.deepcopy(config)).parameters())
            if parameters > MAX_PARAMETERS:
                problems.append("%s config: %.0fM parameters" % (level, parameters / 1e6))
                continue
            return config, level
        except Exception as error:  # noqa: BLE001
            problems.append("%s config: %s" % (level, _one_line(error)))
    raise TargetError("%s: could not build a small %s (%s); pass module:callable instead"
                      % (model_type, cls.__name__, "; ".join(problems)))


# =========================================================================== checking

def _bits(tensor):
    return tensor.detach().cpu().contiguous().reshape(-1).view(__import__("torch").uint8)


def _identical(a, b):
    import torch

    return (a.dtype == b.dtype and a.device == b.device and a.shape == b.shape and not a.is_meta
            and torch.equal(_bits(a), _bits(b)))


def _qualified(path, name):
    return "%s.%s" % (path, name) if path else name


def non_persistent_tensors(model):
    """``{qualified name: tensor}``: every non-persistent buffer (shared ones under every name) and every
    plain tensor attribute (4.x rotary ``original_inv_freq``): what a checkpoint does not hold."""
    import torch

    found = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for name, tensor in module._buffers.items():
            if tensor is not None and name in module._non_persistent_buffers_set:
                found[_qualified(path, name)] = tensor
    for path, module in model.named_modules():
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                found.setdefault(_qualified(path, name), value)
    return found


def _fresh_build(build, seed=0):
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


def check_flows(target, progress=lambda text: None, built=lambda: None):
    """Run every flow on ``target`` in this interpreter (bufferfix on or off, whatever it is here).

    Returns ``{"buffers": [names in the normal build], "random": [names that differ between two normal
    builds], "flows": {flow: {"error", "broken", "warnings"}}}``; raises :class:`TargetError` when the
    normal build fails."""
    import torch

    import bufferfix
    from bufferfix import flows

    if target.tiny:
        torch.set_num_threads(1)
    try:
        reference = _fresh_build(target.build)
    except Exception as error:  # noqa: BLE001 - user code
        raise TargetError("%s: building it raised %s" % (target.text, _one_line(error))) from None
    if not isinstance(reference, torch.nn.Module):
        raise TargetError("%s: built a %s, not a torch.nn.Module" % (target.text, type(reference).__name__))
    built()
    progress("built %s; running it through each flow with bufferfix..." % target.description)
    expected = non_persistent_tensors(reference)
    other_seed = non_persistent_tensors(_fresh_build(target.build, seed=1))
    random = [name for name, tensor in expected.items()
              if name not in other_seed or not _identical(other_seed[name], tensor)]
    state_dict = reference.state_dict()
    runs = {name: (lambda flow=flow: flow(lambda: _fresh_build(target.build), state_dict))
            for name, flow in flows.FLOWS.items()}
    model_class = _pretrained_class(target, reference)
    if "transformers" in sys.modules:
        _transformers()  # quiet: no progress bars or loading reports in the middle of ours
    if model_class is not None:
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
                    result["error"] = _one_line(error)
                    model = None
            result["warnings"] = sorted({str(w.message) for w in caught
                                         if issubclass(w.category, bufferfix.BufferFixWarning)})
            if model is not None:
                got = non_persistent_tensors(model)
                result["broken"] = [name for name, tensor in expected.items()
                                    if name not in got or not _identical(got[name], tensor)]
                del model
    return {"buffers": list(expected), "random": random, "flows": results}


def _summarise_recovery(how):
    if how.startswith("replay of"):
        return "replay"
    if how.startswith("registered recompute function"):
        return "recompute function"
    if how.startswith("snapshot"):
        return "snapshot"
    if how.startswith("real value"):
        return "kept real"
    return how


def explain(target):
    """``[{name, module_class, kind, shape, dtype, recovery, how, why_not}]`` for a build on meta
    (``torch.device("meta")``, the hardest case: nothing real ever existed), or ``(None, error)``
    when the model does not build on meta."""
    import torch

    from bufferfix.mechanism.materialise import Materialisation

    try:
        with torch.device("meta"):
            model = _fresh_build(target.build)
    except Exception as error:  # noqa: BLE001 - user code
        return None, _one_line(error)
    explained = {id(tensor): (how, why) for _, tensor, how, why in Materialisation(model).explain()}
    owners = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for name in list(module._buffers) + list(vars(module)):
            owners.setdefault(_qualified(path, name), type(module).__name__)
    buffer_names = {_qualified(path, name) for path, module in model.named_modules(remove_duplicate=False)
                    for name in module._buffers}
    entries = []
    for name, tensor in non_persistent_tensors(model).items():
        how, why = explained.get(id(tensor), (None, None))
        if how is None and why is None:
            if not tensor.is_meta:
                how = "real value kept"  # a plain attribute that is real even on meta: nothing to do
            else:
                why = "bufferfix does not track it"
        entries.append({
            "name": name, "module_class": owners.get(name, "?"),
            "kind": "buffer" if name in buffer_names else "attribute",
            "shape": list(tensor.shape), "dtype": str(tensor.dtype).replace("torch.", ""),
            "recovery": _summarise_recovery(how) if how else "cannot", "how": how, "why_not": why,
        })
    return entries, None


# --------------------------------------------------------------------------- without bufferfix

def _child_environment():
    """BUFFERFIX_DISABLE=1, and this interpreter's own import paths (a module:callable target that
    was importable here must be importable there)."""
    environment = dict(os.environ, BUFFERFIX_DISABLE="1")
    system = tuple(os.path.realpath(p) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix})
    extra = []
    for entry in sys.path:
        entry = os.path.realpath(entry or os.getcwd())
        if not entry.startswith(system) and os.path.isdir(entry) and entry not in extra:
            extra.append(entry)
    if environment.get("PYTHONPATH"):
        extra.append(environment["PYTHONPATH"])
    environment["PYTHONPATH"] = os.pathsep.join(extra)
    return environment


def start_without_bufferfix(arguments):
    """Start :func:`check_flows` in a fresh interpreter with ``BUFFERFIX_DISABLE=1`` (it runs while this
    one works); :func:`finish_without_bufferfix` collects it."""
    command = [sys.executable, "-m", "bufferfix.doctor", "--flows-only", arguments.target]
    if arguments.model_class:
        command += ["--class", arguments.model_class]
    if arguments.trust_remote_code:
        command.append("--trust-remote-code")
    return subprocess.Popen(command, env=_child_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish_without_bufferfix(child):
    """``(result, error)`` of the child started by :func:`start_without_bufferfix`."""
    stdout, stderr = child.communicate()
    lines = stdout.strip().splitlines()
    if child.returncode != 0 or not lines:
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        return None, "the BUFFERFIX_DISABLE=1 interpreter failed (exit %d): %s" % (child.returncode, tail)
    answer = json.loads(lines[-1])
    if answer.get("bufferfix_enabled"):
        return None, "bufferfix was active in the BUFFERFIX_DISABLE=1 interpreter"
    return answer, None


# =========================================================================== report

def diagnose(arguments, progress=lambda text: None):
    """Everything the doctor finds, as one JSON-able dict."""
    target = resolve(arguments.target, arguments.model_class, arguments.trust_remote_code)
    children = []  # once the target builds: each flow without bufferfix, meanwhile, in a fresh interpreter
    try:
        with_fix = check_flows(target, progress, lambda: children.append(start_without_bufferfix(arguments)))
        progress("asking bufferfix how it would recover each buffer of a build on meta...")
        entries, meta_error = explain(target)
    except BaseException:
        for child in children:
            child.kill()
            child.communicate()
        raise
    [child] = children
    progress("waiting for the same flows without bufferfix (BUFFERFIX_DISABLE=1, fresh interpreter)...")
    without, without_error = finish_without_bufferfix(child)
    buffers, random = with_fix["buffers"], set(with_fix["random"])
    if entries is None:
        entries = [{"name": name, "module_class": "?", "kind": "?", "shape": None, "dtype": None,
                    "recovery": "unknown", "how": None,
                    "why_not": "the model does not build under torch.device('meta'): " + meta_error}
                   for name in buffers]
    from_pretrained_without = (without or {}).get("flows", {}).get(FROM_PRETRAINED)
    for entry in entries:
        entry["random"] = entry["name"] in random  # two normal builds (different seeds) differ
        entry["transformers_init"] = None  # does from_pretrained give it back even without bufferfix?
        if from_pretrained_without is not None and from_pretrained_without["error"] is None:
            entry["transformers_init"] = entry["name"] not in from_pretrained_without["broken"]
    flows_report = {}
    for name, result in with_fix["flows"].items():
        other = (without or {}).get("flows", {}).get(name)
        if result["error"] is not None:
            verdict = "not applicable" if other is not None and other["error"] is not None else "wrong"
        elif not result["broken"]:
            verdict = "ok"
        elif set(result["broken"]) <= random:
            verdict = "random buffers differ"  # no build reproduces another build's random values
        else:
            verdict = "wrong"
        flows_report[name] = {"with_bufferfix": result, "without_bufferfix": other, "verdict": verdict}
    unrecoverable = [entry["name"] for entry in entries if entry["recovery"] == "cannot"]
    wrong = [name for name, report in flows_report.items() if report["verdict"] == "wrong"]
    return {
        "target": arguments.target, "model": target.description, "buffers": entries,
        "meta_build_error": meta_error, "flows": flows_report, "without_bufferfix_error": without_error,
        "unrecoverable": unrecoverable, "wrong_with_bufferfix": wrong, "ok": not unrecoverable and not wrong,
    }


def _short(text):
    """``package.module.Class(...)`` -> ``Class(...)``; the first of several reasons."""
    return re.sub(r"(?:[A-Za-z_<][\w<>]*\.)+([A-Za-z_]\w*\(\.\.\.\))", r"\1", text.split("; ")[0])


def _short_how(entry):
    if entry["recovery"] == "cannot":
        return "CANNOT: " + _short(entry["why_not"] or "?")
    return _short(entry["how"] or entry["recovery"])


def _flow_cell(result, total, enabled, random):
    if result is None:
        return "not run"
    if result["error"] is not None:
        return ("error: " + result["error"])[:70]
    if not total:
        return "ok (no buffers)"
    if not result["broken"]:
        return "ok: %d/%d identical" % (total, total) if enabled else "ok: %d/%d identical (unaffected)" % (total, total)
    shown = ", ".join(result["broken"][:2]) + (", ..." if len(result["broken"]) > 2 else "")
    if enabled and set(result["broken"]) <= random:
        return "random: %d/%d differ (%s)" % (len(result["broken"]), total, shown)
    return "%s: %d/%d differ (%s)" % ("WRONG" if enabled else "broken", len(result["broken"]), total, shown)


def format_report(report):
    lines = ["bufferfix doctor: %s (%s)" % (report["target"], report["model"]), ""]
    entries = report["buffers"]
    if not entries:
        lines.append("No non-persistent buffers: nothing for bufferfix to do; every flow only needs the checkpoint.")
    else:
        transformers_column = any(entry["transformers_init"] is not None for entry in entries)
        lines.append("Non-persistent buffers (%d); recovery as bufferfix would do it for a model built under "
                     "torch.device('meta'):" % len(entries))
        rows = [("name", "module", "shape", "dtype", "recovery")
                + (("transformers init",) if transformers_column else ())]
        for entry in entries:
            row = (entry["name"] + (" (attribute)" if entry["kind"] == "attribute" else "")
                   + (" (random)" if entry["random"] else ""), entry["module_class"],
                   str(tuple(entry["shape"])) if entry["shape"] is not None else "?",
                   entry["dtype"] or "?", _short_how(entry))
            if transformers_column:
                row += ({True: "yes", False: "no", None: "?"}[entry["transformers_init"]],)
            rows.append(row)
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            lines.append("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
        if transformers_column:
            lines.append("  (transformers init: does from_pretrained get it right even without bufferfix? Measured: "
                         "transformers 5 recomputes the buffers its models' _init_weights know)")
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
    for name, flow in report["flows"].items():
        lines.append("  %-*s %-*s %s" % (width, name, middle, cells[name][0], cells[name][1]))
        for message in flow["with_bufferfix"]["warnings"]:
            items = [line.strip()[2:] for line in message.splitlines() if line.strip().startswith("- ")]
            for item in items or [message.strip().splitlines()[0]]:
                lines.append("  %-*s   bufferfix warned: %s" % (width, "", _short(item)))
    if random:
        lines.append("  (random: %s: two normal builds with different seeds differ there; no flow can give back a "
                     "particular build's values unless its real tensor survives)" % ", ".join(sorted(random)))
    if report["without_bufferfix_error"]:
        lines.append("  (without bufferfix: %s)" % report["without_bufferfix_error"])
    lines.append("")
    if report["ok"]:
        lines.append("OK: bufferfix recovers every non-persistent buffer in every flow." if entries else "OK.")
    else:
        if report["unrecoverable"]:
            lines.append("PROBLEM: bufferfix cannot recover %s; register a recompute function "
                         "(bufferfix.register_recompute(ModuleClass, fn)) or build this model normally."
                         % ", ".join(report["unrecoverable"]))
        if report["wrong_with_bufferfix"]:
            lines.append("PROBLEM: wrong even with bufferfix: %s." % ", ".join(report["wrong_with_bufferfix"]))
    return "\n".join(lines)


# =========================================================================== command line

def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m bufferfix doctor",
        description="List a model's non-persistent buffers, how bufferfix recovers each one, and check every "
                    "meta-device flow bit for bit against a normal build, with bufferfix and without it.",
        epilog="TARGET: a directory written by save_pretrained; a transformers model type (%s) or class name, "
               "built from its default config shrunk to a tiny size; or module:callable / file.py:callable "
               "returning an nn.Module. Exit status: 0 all good, 1 a buffer cannot be recovered or a flow is "
               "wrong with bufferfix, 2 a bad target." % _EXAMPLES)
    parser.add_argument("target", metavar="TARGET", help="model directory, model type or class name, or module:callable")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--class", dest="model_class", metavar="NAME",
                        help="the transformers model class to build (default: the directory's architectures "
                             "field; for a model type its causal LM for decoders, else its base model)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a local model directory's custom code to run")
    parser.add_argument("--flows-only", action="store_true", help=argparse.SUPPRESS)  # one JSON line, for the child
    return parser


def main(argv=None):
    arguments = _parser().parse_args(argv)
    try:
        import bufferfix

        if arguments.flows_only:
            result = check_flows(resolve(arguments.target, arguments.model_class, arguments.trust_remote_code))
            result["bufferfix_enabled"] = bufferfix.is_enabled()
            print(json.dumps(result))
            return 0
        if not bufferfix.is_enabled():
            os.environ.pop("BUFFERFIX_DISABLE", None)  # the doctor checks bufferfix: it must be on here
            if not bufferfix.enable():
                print("bufferfix doctor: bufferfix cannot be enabled", file=sys.stderr)
                return 2
        progress = (lambda text: None) if arguments.json else (lambda text: print("... " + text, file=sys.stderr,
                                                                                   flush=True))
        report = diagnose(arguments, progress)
    except TargetError as error:
        print("bufferfix doctor: %s" % error, file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if arguments.json else format_report(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
