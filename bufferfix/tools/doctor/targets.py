"""What the doctor builds: a TARGET string -> :class:`Target` (or :class:`TargetError`).

TARGET is one of

* a local model directory written by ``save_pretrained`` (its ``config.json`` names the class);
* a transformers model type (``llama``, ``bert``, ``gpt2``...) or model class name
  (``LlamaForCausalLM``): its default config, shrunk to a tiny size, is built;
* ``module:callable`` (or ``path/to/file.py:callable``): ``callable()`` returns the ``nn.Module``;
  the module is looked up as ``python -m`` does, the current directory first.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..errors import UsageError, one_line, require

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel

MAX_PARAMETERS = 50_000_000  # a model type whose tiny config is still bigger than this is refused
EXAMPLES = "e.g. llama, bert, gpt2"


class TargetError(UsageError):
    """The target does not exist or does not build: exit 2 with this one-line message."""


@dataclasses.dataclass
class Target:
    """What to build: ``build()`` (called normally, or under ``torch.device("meta")``)."""

    text: str  # as the user wrote it
    description: str
    build: Callable[[], nn.Module]
    model_class: type[PreTrainedModel] | None = None  # a transformers PreTrainedModel class: from_pretrained applies
    pretrained_dir: str | None = None  # from_pretrained loads from here (a model directory), else saves a normal build
    tiny: bool = False  # a tiny config: torch runs single-threaded (faster for tiny tensors)


def resolve(text: str, class_name: str | None = None, trust_remote_code: bool = False) -> Target:
    """TARGET string -> :class:`Target`, or :class:`TargetError`."""
    if os.path.isdir(text):
        return _directory_target(text, class_name, trust_remote_code)
    module, colon, attribute = text.rpartition(":")
    if colon and module and attribute and not os.path.exists(text):
        return _callable_target(text, module, attribute)
    if text.endswith(".py") or os.path.isfile(text + ".py"):
        if not os.path.isfile(text if text.endswith(".py") else text + ".py"):
            raise TargetError("%s: no such file" % text)
        raise TargetError("%s: a Python file: add the callable that builds the model, as %s:CALLABLE"
                          % (text, text))
    if os.sep in text or "/" in text or text.startswith((".", "~")):
        raise TargetError("%s: no such directory" % text)
    return _type_target(text, class_name)


def transformers_quietly() -> ModuleType:
    """transformers, with its progress bars and loading reports off (they would break our output)."""
    transformers = require("transformers", "accelerate", what="this target")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


# --------------------------------------------------------------------------- module:callable

def _callable_target(text: str, module_name: str, attribute: str) -> Target:
    if module_name.endswith(".py"):
        if not os.path.isfile(module_name):
            raise TargetError("%s: no such file" % module_name)
        spec = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
        assert spec is not None and spec.loader is not None  # a .py file: Python's own source loader
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as error:  # noqa: BLE001 - user code
            raise TargetError("%s: running it raised %s" % (module_name, one_line(error))) from None
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m` does: a module in the current directory is found
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name and (module_name == error.name or module_name.startswith(error.name + ".")):
                raise TargetError("%s: no module named %r (is it on PYTHONPATH?)" % (text, error.name)) from None
            raise TargetError("%s: importing %s raised %s" % (text, module_name, one_line(error))) from None
        except Exception as error:  # noqa: BLE001 - user code
            raise TargetError("%s: importing %s raised %s" % (text, module_name, one_line(error))) from None
    value: Any = module  # then whatever the user's code holds under that name
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise TargetError("%s: %s has no attribute %r" % (text, module_name, part)) from None
    if not callable(value):
        raise TargetError("%s: %s is not callable" % (text, attribute))
    return Target(text, "%s() from %s" % (attribute, module_name), value)


# --------------------------------------------------------------------------- a saved model directory

def _model_class(transformers: ModuleType, name: str, where: str) -> type[PreTrainedModel]:
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise TargetError("%s: %r is not a transformers model class" % (where, name))
    return cls


def _directory_target(directory: str, class_name: str | None, trust_remote_code: bool) -> Target:
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise TargetError("%s: a directory, but not a saved transformers model (no config.json); for any other "
                          "model pass module:callable" % directory)
    try:
        with open(os.path.join(directory, "config.json")) as handle:
            custom = "auto_map" in json.load(handle)
    except (OSError, ValueError) as error:
        raise TargetError("%s: cannot read its config.json: %s" % (directory, one_line(error))) from None
    if custom and not trust_remote_code:
        raise TargetError("%s: its config names custom code (auto_map); pass --trust-remote-code to run it" % directory)
    transformers = transformers_quietly()
    try:
        config = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except Exception as error:  # noqa: BLE001
        raise TargetError("%s: cannot read its config: %s" % (directory, one_line(error))) from None
    cls = (_model_class(transformers, class_name, directory) if class_name
           else _saved_model_class(transformers, config, directory, trust_remote_code))
    weights = any(name.endswith((".safetensors", ".bin", ".index.json")) for name in os.listdir(directory))
    return Target(directory, "%s from %s" % (cls.__name__, directory), lambda: cls(copy.deepcopy(config)), cls,
                  pretrained_dir=directory if weights else None)  # no weights there: from_pretrained a normal build


def _saved_model_class(transformers: ModuleType, config: PretrainedConfig, directory: str,
                       trust_remote_code: bool) -> type[PreTrainedModel]:
    """The class a saved config names (its ``architectures``, custom code, or the auto mapping)."""
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    auto_map = getattr(config, "auto_map", None) or {}
    if cls is None and architectures and auto_map:
        if not trust_remote_code:
            raise TargetError("%s: its model %s is custom code; pass --trust-remote-code to run it"
                              % (directory, architectures[0]))
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        models = [value for key, value in auto_map.items() if key.startswith("AutoModel")]
        reference = next((value for value in models if str(value).endswith("." + architectures[0])),
                         models[0] if models else None)
        if reference is None:
            raise TargetError("%s: its config's auto_map names no model class" % directory)
        try:
            cls = get_class_from_dynamic_module(reference, directory)
        except Exception as error:  # noqa: BLE001
            raise TargetError("%s: cannot load its custom code: %s" % (directory, one_line(error))) from None
    if cls is None:
        try:
            cls = transformers.AutoModel._model_mapping[type(config)]
        except Exception:  # noqa: BLE001
            raise TargetError("%s: cannot tell which model class to build (architectures: %s); pass --class"
                              % (directory, architectures or "none")) from None
    return cls


# --------------------------------------------------------------------------- a model type, tiny

def _type_target(name: str, class_name: str | None) -> Target:
    transformers = transformers_quietly()
    from transformers.models.auto import configuration_auto

    model_type: str | None = name
    cls: type[PreTrainedModel] | None = None
    as_class = getattr(transformers, name, None)
    if isinstance(as_class, type) and issubclass(as_class, transformers.PreTrainedModel):
        # a PreTrainedModel class: mypy cannot narrow to one read off the module (Any)
        cls, model_type = as_class, getattr(as_class.config_class, "model_type", None)  # type: ignore[attr-defined]
    elif name not in configuration_auto.CONFIG_MAPPING_NAMES and name.lower() in configuration_auto.CONFIG_MAPPING_NAMES:
        model_type = name.lower()
    if model_type not in configuration_auto.CONFIG_MAPPING_NAMES:
        close = difflib.get_close_matches(name.lower(), configuration_auto.CONFIG_MAPPING_NAMES, n=3)
        raise TargetError("%s: unknown target: not a directory, not module:callable, and not a transformers model "
                          "type (%s)" % (name, "did you mean %s?" % " / ".join(close) if close else EXAMPLES))
    assert model_type is not None  # one of CONFIG_MAPPING_NAMES, whose keys are strings
    if class_name:
        cls = _model_class(transformers, class_name, name)
        own = getattr(cls.config_class, "model_type", None)
        if own and own != model_type:
            assert cls.config_class is not None  # own was read off it
            default = _default_class_name(name, model_type)
            raise TargetError("%s: %s is a %s model, not a %s one (its config is %s); pass a %s class, e.g. --class %s"
                              % (name, class_name, own, model_type, cls.config_class.__name__, model_type, default))
    if cls is None:
        cls = _model_class(transformers, _default_class_name(name, model_type), name)
    config, level = _small_config(model_type, cls)
    return Target(name, "%s, %s" % (cls.__name__, _config_words(level)), lambda: cls(copy.deepcopy(config)), cls,
                  tiny=True)


def _config_words(level: str) -> str:
    """``"tiny"`` -> ``"tiny config"``; ``"default config"`` stays as it is."""
    return level if level.endswith("config") else level + " config"


def _default_class_name(name: str, model_type: str) -> str:
    """Decoder-only LMs: the causal LM; encoders and encoder-decoders: the base model."""
    from transformers.models.auto import configuration_auto, modeling_auto

    causal = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    masked = modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES.get(model_type)
    base = modeling_auto.MODEL_MAPPING_NAMES.get(model_type)
    try:
        encoder_decoder = bool(configuration_auto.CONFIG_MAPPING[model_type]().is_encoder_decoder)
    except Exception:  # noqa: BLE001 - a config that does not build by default fails later, clearly
        encoder_decoder = False
    choice = causal if causal and not masked and not encoder_decoder else base or causal
    if isinstance(choice, (list, tuple)):
        choice = choice[0]
    if not choice:
        raise TargetError("%s: transformers has no base or causal-LM model for this type; pass --class" % name)
    assert isinstance(choice, str)  # transformers' mappings name a class, or a tuple of them (the first taken above)
    return choice


def _small_config(model_type: str, cls: type[PreTrainedModel]) -> tuple[PretrainedConfig, str]:
    """``(config, level)``: the first level of :data:`tiny_configs.LEVELS` whose model builds on
    meta with at most :data:`MAX_PARAMETERS` parameters (later levels shrink less: bigger still)."""
    import torch

    from .. import tiny_configs

    problems: dict[str, list[str]] = {}  # what went wrong -> the levels it went wrong at (the same error is given once)
    for level, what in tiny_configs.LEVELS:
        try:
            config = tiny_configs.tiny_config(model_type, what)
            with torch.device("meta"):  # size it without touching memory
                parameters = sum(p.numel() for p in cls(copy.deepcopy(config)).parameters())
        except Exception as error:  # noqa: BLE001 - the next level may build
            problems.setdefault(one_line(error), []).append(_config_words(level))
            continue
        if parameters <= MAX_PARAMETERS:
            return config, level
        problems.setdefault("%.0fM parameters" % (parameters / 1e6), []).append(_config_words(level))
        break
    raise TargetError("%s: could not build a small %s (%s); pass module:callable instead" % (
        model_type, cls.__name__, "; ".join("%s: %s" % (" / ".join(levels), problem)
                                            for problem, levels in problems.items())))
