"""Models for ``python -m bufferfix.doctor module:callable`` in tests/test_cli.py."""
import torch
from models import CausalMask, Sinusoidal
from torch import nn


class Positions(nn.Module):
    """A sinusoidal position table and a causal mask: deterministic, recoverable by replay."""

    def __init__(self, positions=16, dim=8):
        super().__init__()
        self.table = Sinusoidal(positions, dim)
        self.mask = CausalMask(positions)
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))  # persistent: in the checkpoint


class RandomProjection(nn.Module):
    """A buffer drawn from the random number generator: no build on meta can know its values."""

    def __init__(self, dim=8):
        super().__init__()
        self.register_buffer("projection", torch.randn(dim, dim), persistent=False)
        self.register_buffer("steps", torch.arange(float(dim)), persistent=False)


class WithRandomBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.positions = Positions()
        self.random = RandomProjection()


def clean_model():
    return nn.Sequential(Positions(), nn.Linear(8, 8))


def random_buffer_model():
    return WithRandomBuffer()


def no_buffers():
    return nn.Linear(3, 3)


def fails_to_build():
    raise RuntimeError("this model needs a GPU")


def not_a_module():
    return 42



_custom = {}


def custom_pretrained_model():
    """A custom transformers model whose ``_init_weights`` does not know its buffer (transformers
    issue 48892).  Defined on first use, so that the other targets here never import transformers."""
    if not _custom:
        import transformers

        class CustomConfig(transformers.PretrainedConfig):
            model_type = "bufferfix-cli-custom"

            def __init__(self, size=4, **kwargs):
                self.size = size
                super().__init__(**kwargs)

        class CustomModel(transformers.PreTrainedModel):
            config_class = CustomConfig

            def __init__(self, config):
                super().__init__(config)
                self.proj = nn.Linear(config.size, config.size)
                self.register_buffer("scale", torch.linspace(0.5, 2.0, config.size), persistent=False)
                self.post_init()

        _custom.update(config=CustomConfig, model=CustomModel)
    return _custom["model"](_custom["config"]())
