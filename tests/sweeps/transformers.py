"""The transformers sweep: every ``model_type`` in transformers' auto mappings, made tiny.

Each architecture gets a tiny config (generic: size attributes are overridden in the config and in
its sub-configs; the first of :data:`bufferfix.tools.tiny_configs.LEVELS` whose model builds under
:data:`MAX_PARAMETERS`), and runs every flow of the harness plus ``save_pretrained`` ->
``from_pretrained``.  Outputs are compared where a generic input exists (``input_ids``,
``pixel_values``, ``input_values``, ``input_features``).  Nothing is downloaded: configs are the
library defaults, shrunk.

    python -m sweeps.transformers [--json out.json] [model_type ...]     # from tests/
"""
import copy
import functools
import inspect
import os
import re
import sys
import tempfile

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing here needs the hub

import transformers
from transformers.models.auto import configuration_auto, modeling_auto

import bufferfix
from bufferfix.tools.tiny_configs import LEVELS, VOCAB, tiny_config

from . import harness

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

FROM_PRETRAINED = "from_pretrained"
MAX_PARAMETERS = 80_000_000  # a config still bigger than this after shrinking is skipped, not built
TIME_LIMIT_S = 300  # per architecture, everything included

# --------------------------------------------------------------------------- which architectures

# Preferred model class per model_type: the bare model, else the first head model found.
_MAPPINGS = ["MODEL_MAPPING_NAMES"] + sorted(
    name for name in dir(modeling_auto)
    if name.startswith("MODEL_") and name.endswith("_MAPPING_NAMES") and name != "MODEL_MAPPING_NAMES")


def architectures():
    """{model_type: model class name or None} for every model_type transformers knows."""
    found = {}
    for mapping in _MAPPINGS:
        for model_type, names in getattr(modeling_auto, mapping).items():
            if model_type in configuration_auto.CONFIG_MAPPING_NAMES:
                found.setdefault(model_type, names[0] if isinstance(names, (list, tuple)) else names)
    return {model_type: found.get(model_type) for model_type in configuration_auto.CONFIG_MAPPING_NAMES}


@functools.cache
def _parents():
    """{model_type of a sub-config: [model_types whose config holds it]}."""
    parents = {}
    for model_type in configuration_auto.CONFIG_MAPPING_NAMES:
        try:
            subs = getattr(configuration_auto.CONFIG_MAPPING[model_type], "sub_configs", None)
        except Exception:  # noqa: BLE001
            continue
        if not isinstance(subs, dict):
            continue
        for sub in subs.values():
            if getattr(sub, "model_type", None):
                parents.setdefault(sub.model_type, []).append(model_type)
    return parents


# --------------------------------------------------------------------------- building

def _skip_reason(exc):
    text = harness.error_text(exc)
    if isinstance(exc, ImportError) or re.search(r"requires the|pip install|is not installed|No module named", text):
        return "needs extra dependencies: " + text
    return text


def smallest(model_type, class_name):
    """(level, config, model) for the smallest config of :data:`LEVELS` that builds (the model built
    with ``torch.manual_seed(0)``), or raises :class:`harness.Skip` with what each level gave."""
    from accelerate import init_empty_weights

    try:
        cls = getattr(transformers, class_name)
        if not hasattr(cls, "config_class") and not inspect.isclass(cls):
            raise TypeError("%s is not a model class" % class_name)
    except Exception as exc:
        raise harness.Skip("cannot build: " + _skip_reason(exc)) from exc
    errors = []
    for level, what in LEVELS:
        try:
            config = tiny_config(model_type, what)
            with bufferfix.disabled(), init_empty_weights():  # size it first, without touching weights
                sized = cls(copy.deepcopy(config))
            parameters = sum(p.numel() for p in sized.parameters())
            del sized
            if parameters > MAX_PARAMETERS:  # the levels after this one shrink less: bigger still
                errors.append("%s: %.1fM parameters, over the %dM limit" % (level, parameters / 1e6,
                                                                            MAX_PARAMETERS // 10**6))
                break
            torch.manual_seed(0)
            return level, config, cls(copy.deepcopy(config))
        except harness.OverTime:
            raise
        except Exception as exc:  # noqa: BLE001
            errors.append("%s: %s" % (level, _skip_reason(exc)))
            if "needs extra dependencies" in errors[-1]:
                break
    raise harness.Skip("cannot build: " + " | ".join(errors))


# --------------------------------------------------------------------------- inputs

def _first(config, *keys, default=None, depth=3):
    """A config value, looked for in the config and then in its sub-configs."""
    for key in keys:
        if isinstance(getattr(config, key, None), (int, list, tuple)):
            return getattr(config, key)
    for sub in ("vision_config", "encoder_config", "audio_config", "encoder"):
        sub = getattr(config, sub, None)
        if depth and isinstance(sub, transformers.PretrainedConfig) and sub is not config:
            return _first(sub, *keys, default=default, depth=depth - 1)
    return default


def generic_inputs(model):
    """Candidate forward inputs built from the model's main input, most likely first."""
    config, name = model.config, getattr(model, "main_input_name", "input_ids")
    generator = torch.Generator().manual_seed(1)
    accepted = inspect.signature(model.forward).parameters
    encoder_decoder = getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in accepted
    decoder = dict(decoder_input_ids=torch.tensor([[1, 2, 3, 4, 5]] * 2)) if encoder_decoder else {}
    size = _first(config, "image_size", default=224)
    size = tuple(size)[:2] if isinstance(size, (list, tuple)) else (size, size)
    pixels = torch.randn(2, _first(config, "num_channels", default=3), *size, generator=generator)
    if name == "input_ids":
        vocab = _first(config, "vocab_size") or getattr(getattr(config, "text_config", None), "vocab_size", None)
        if not isinstance(vocab, int):
            raise harness.NoInput("no vocabulary size for input_ids")
        ids = dict(input_ids=torch.randint(3, max(4, min(vocab, VOCAB) - 16), (2, 8), generator=generator))
        with_pixels = [dict(ids, pixel_values=pixels)] if "pixel_values" in accepted else []  # CLIP-like
        return [dict(ids, **decoder)] + with_pixels
    if name == "pixel_values":
        return [dict(pixel_values=pixels)]
    if name == "input_values":
        audio = torch.randn(2, 4000, generator=generator)
        return [dict(input_values=audio), dict(input_values=audio[:, None])]
    if name == "input_features":
        bins = _first(config, "num_mel_bins", "feature_size", "input_feat_per_channel", default=80)
        frames = 2 * (_first(config, "max_source_positions", default=32) or 32)  # Whisper wants exactly this
        return [dict(input_features=torch.randn(2, bins, frames, generator=generator), **decoder),
                dict(input_features=torch.randn(2, 64, bins, generator=generator), **decoder)]
    raise harness.NoInput("no generic input for %s" % name)


# --------------------------------------------------------------------------- cases

def _from_pretrained(build, reference):
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        return type(reference).from_pretrained(directory)


LOADERS = {FROM_PRETRAINED: harness.Flow(_from_pretrained, from_files=True)}


def case(model_type, class_name=None):
    """The case of one ``model_type`` (``class_name``: its model class, default the auto mappings')."""
    class_name = class_name or architectures().get(model_type)
    built = {}

    def build():
        if class_name is None:
            parents = _parents().get(model_type)
            raise harness.Skip("no model class in transformers' auto mappings" + (
                " (a sub-config, built inside %s)" % ", ".join(parents[:3]) if parents else ""))
        if "config" not in built:  # the first build finds the level; the model it built is the first build
            level, config, model = smallest(model_type, class_name)
            built.update(level=level, config=config, cls=type(model))
            return model
        return built["cls"](copy.deepcopy(built["config"]))

    return harness.Case(model_type, build, inputs=generic_inputs, loaders=LOADERS, level=lambda: built.get("level"),
                        time_limit_s=TIME_LIMIT_S)


def cases():
    return [case(model_type, class_name) for model_type, class_name in sorted(architectures().items())]


# --------------------------------------------------------------------------- report

def skip_category(reason):
    if reason.startswith("no model class"):
        return "no model class of its own in the auto mappings (mostly sub-configs, covered inside their parent)"
    if "needs extra dependencies" in reason:
        return "needs a library that is not installed (timm, PIL, scipy, natten, torchaudio, ...)"
    if "module transformers has no attribute" in reason:
        return "the auto mapping names a class transformers does not export"
    if "huggingface.co" in reason or "Can't load the configuration" in reason:
        return "default config names a hub checkpoint (the sweep is offline: nothing is downloaded)"
    if "time limit" in reason:
        return "over the time limit"
    tries = reason.split(" | ")
    if "parameters, over the" in tries[-1] or "can't allocate memory" in tries[-1]:
        if len(tries) == 1:
            return "over the parameter limit even with the tiny config"
        return "tiny config rejected (a constraint the generic shrinking misses), bigger ones over the size limits"
    if tries[-1].startswith("default config:"):
        return "does not build from its default config either (None defaults, composites needing sub-configs)"
    return "other: " + reason[:80]


LIBRARY = harness.Library(
    "transformers", cases, lambda: "transformers %s, torch %s" % (transformers.__version__, torch.__version__),
    skip_category=skip_category)

if __name__ == "__main__":
    sys.exit(harness.main(LIBRARY))
