"""The diffusers sweep: every ``ModelMixin`` class diffusers exports, built from its default config
shrunk generically (layers, channels, heads, widths, sample size, RoPE axes), through every flow of the
harness and diffusers' own loading paths (``save_pretrained`` then
``from_pretrained(low_cpu_mem_usage=True)`` and ``from_pretrained(device_map="cpu")``).

Like the transformers sweep, each class gets the first of :data:`LEVELS` whose model builds and is
under :data:`MAX_PARAMETERS`; a class none of them builds is listed as skipped, with each level's
error.  Outputs are compared where a generic input fits (``sample`` [+ ``timestep``]
[+ ``encoder_hidden_states``]); everything else is compared on every class.

    python -m sweeps.diffusers [--json out.json] [name ...]     # from tests/
"""
import inspect
import os
import re
import sys
import tempfile

import torch

from . import harness

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MAX_PARAMETERS = 40_000_000
LOW_CPU_MEM = "from_pretrained(low_cpu_mem_usage=True)"
DEVICE_MAP = "from_pretrained(device_map='cpu')"

_LAYERS = re.compile(r"(^|_)(num_)?(layers|layers_per_block|blocks|depth|depths|single_layers|res_blocks)$")
_BLOCK_CHANNELS = re.compile(r"block_out_channels$|^channels$|^base_channels$|^ch$|^decoder_channels$|_base_dim$")
_WIDTH = re.compile(r"(cross_attention_dim|joint_attention_dim|pooled_projection_dim|caption_projection_dim|"
                    r"caption_channels|text_embed_dim|cap_feat_dim|context_in_dim|time_embed_dim|"
                    r"hidden_size|hidden_dim|inner_dim|embed_dim|d_model|d_ff|intermediate_size|"
                    r"cond_embed_dim|projection_dim|encoder_hid_dim|text_dim|vec_in_dim|mlp_dim)$")
_HEADS = re.compile(r"num_attention_heads$|_num_heads$|^num_heads$|^heads$")
_HEAD_DIM = re.compile(r"attention_head_dim$|head_dim$|dim_head$")
_GROUPS = re.compile(r"num_groups$|norm_groups$")
_AXES = re.compile(r"^axes_dims?(_rope)?$")
HEAD_DIM, HEADS, WIDTH, CHANNELS, GROUPS, SAMPLE = 16, 2, 32, 32, 8, 32


def _ints(value):
    return isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and not isinstance(v, bool)
                                                              for v in value)


def _int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _split(total, parts):
    """``total`` split in ``parts`` even numbers (RoPE axes must add up to the head dim)."""
    each = max(2, (total // parts) // 2 * 2)
    return [each] * (parts - 1) + [total - each * (parts - 1)]


def shrink(defaults, what):
    """The constructor's defaults with sizes overridden as far as ``what`` says."""
    config = dict(defaults)
    for key, value in defaults.items():
        if _LAYERS.search(key) and "layers" in what:
            if _int(value) and value > 1:
                config[key] = 1
            elif _ints(value):
                config[key] = type(value)(min(v, 1) for v in value)
        if "widths" not in what:
            continue
        if _BLOCK_CHANNELS.search(key):
            if _ints(value):
                config[key] = type(value)(min(v, CHANNELS) for v in value)
            elif _int(value) and value > CHANNELS:
                config[key] = CHANNELS
        elif _HEAD_DIM.search(key):
            if _int(value) and value > HEAD_DIM:
                config[key] = HEAD_DIM
            elif _ints(value):
                config[key] = type(value)(min(v, HEAD_DIM) for v in value)
        elif _HEADS.search(key):
            if _int(value) and value > HEADS:
                config[key] = HEADS
            elif _ints(value):
                config[key] = type(value)(min(v, HEADS) for v in value)
        elif _WIDTH.search(key) and _int(value) and value > WIDTH:
            config[key] = WIDTH
        elif _GROUPS.search(key) and _int(value) and value > GROUPS:
            config[key] = GROUPS
        elif key == "sample_size" and _int(value) and value > SAMPLE:
            config[key] = SAMPLE
        elif key == "sample_size" and _ints(value):
            config[key] = type(value)(min(v, SAMPLE) for v in value)
    for key, value in defaults.items():
        if "widths" in what and _AXES.search(key) and _ints(value):
            head_dim = next((config[k] for k in config if _HEAD_DIM.search(k) and _int(config[k])), HEAD_DIM)
            config[key] = type(value)(_split(head_dim, len(value)))
    return config


LEVELS = [("tiny", {"layers", "widths"}), ("fewer layers", {"layers"}), ("default config", set())]


def model_classes():
    import diffusers
    from diffusers import ModelMixin

    found = {}
    for name in dir(diffusers):
        try:
            value = getattr(diffusers, name)
        except Exception:  # noqa: BLE001 - a lazy import that fails: no such model here
            continue
        if inspect.isclass(value) and issubclass(value, ModelMixin) and value is not ModelMixin:
            found.setdefault(value.__name__, value)
    return [found[name] for name in sorted(found)]


def _defaults(cls):
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if name != "self" and p.default is not p.empty and p.kind is p.POSITIONAL_OR_KEYWORD}


def tiny_kwargs(cls):
    """(level, kwargs) of the first level whose model builds under the parameter limit, or raises."""
    from accelerate import init_empty_weights

    errors = []
    for level, what in LEVELS:
        kwargs = shrink(_defaults(cls), what)
        try:
            with harness.bufferfix_enabled(False), init_empty_weights():
                sized = cls(**kwargs)
            parameters = sum(p.numel() for p in sized.parameters())
            del sized
        except harness.OverTime:
            raise
        except Exception as exc:  # noqa: BLE001
            errors.append("%s: %s" % (level, harness.error_text(exc)[:160]))
            continue
        if parameters > MAX_PARAMETERS:
            errors.append("%s: %.1fM parameters, over the %dM limit" % (level, parameters / 1e6,
                                                                        MAX_PARAMETERS // 10**6))
            continue
        return level, kwargs
    raise RuntimeError(" | ".join(errors))


def _inputs(model):
    """``sample`` [+ ``timestep``] [+ ``encoder_hidden_states``] from the model's config, when its
    forward takes those."""
    parameters = list(inspect.signature(model.forward).parameters)
    config = model.config
    if not parameters or parameters[0] != "sample" or not _int(config.get("in_channels")):
        raise harness.NoInput("no generic input for forward(%s)" % ", ".join(parameters[:3]))
    size = config.get("sample_size") or SAMPLE
    size = size if _int(size) else tuple(size)[0]
    generator = torch.Generator().manual_seed(1)
    inputs = dict(sample=torch.randn(1, config["in_channels"], size, size, generator=generator))
    if "timestep" in parameters:
        inputs["timestep"] = torch.tensor([10])
    if "encoder_hidden_states" in parameters and _int(config.get("cross_attention_dim")):
        inputs["encoder_hidden_states"] = torch.randn(1, 4, config["cross_attention_dim"], generator=generator)
    return inputs


def _from_pretrained(**options):
    def load(build, reference):
        with tempfile.TemporaryDirectory() as directory:
            reference.save_pretrained(directory)
            return type(reference).from_pretrained(directory, **options)

    return load


LOADERS = {LOW_CPU_MEM: harness.Flow(_from_pretrained(low_cpu_mem_usage=True), from_files=True),
           DEVICE_MAP: harness.Flow(_from_pretrained(device_map="cpu"), from_files=True)}


def case(cls):
    found = {}  # (level, kwargs), once the first build has found them

    def build():
        if not found:
            torch_state = torch.random.get_rng_state()
            try:
                found["level"], found["kwargs"] = tiny_kwargs(cls)
            finally:
                torch.random.set_rng_state(torch_state)
        return cls(**found["kwargs"])

    return harness.Case("diffusers." + cls.__name__, build, inputs=_inputs, loaders=LOADERS,
                        level=lambda: found.get("level"))


def cases():
    return [case(cls) for cls in model_classes()]


def _version():
    import diffusers

    return "diffusers %s, torch %s" % (diffusers.__version__, torch.__version__)


def _quiet():
    import diffusers

    diffusers.utils.logging.set_verbosity_error()


LIBRARY = harness.Library("diffusers", cases, _version, quiet=_quiet)

if __name__ == "__main__":
    sys.exit(harness.main(LIBRARY))
