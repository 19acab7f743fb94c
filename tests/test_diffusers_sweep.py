"""diffusers: a fixed subset of the diffusers sweep (tests/sweeps/diffusers.py), one model class per kind of buffer.

Each runs every meta flow, ``load_state_dict(assign=True)`` and diffusers' own loading paths
(``from_pretrained(low_cpu_mem_usage=True)``, ``from_pretrained(device_map="cpu")``), with and
without bufferfix, bit for bit against a normal build.  The full sweep (every ``ModelMixin`` class,
its default config shrunk; about twenty minutes on 2 cores)::

    python -m pytest -m slow tests/test_diffusers_sweep.py      # or, in tests/: python -m sweeps.diffusers
"""
import functools

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from sweeps import diffusers as sweep
from sweeps import harness

SUBSET = {
    "diffusers.PriorTransformer": "bool causal-mask buffer",
    "diffusers.PixArtTransformer2DModel": "sinusoidal 2-D position table",
    "diffusers.WanTransformer3DModel": "RoPE cos / sin tables",
    "diffusers.QwenImageTransformer2DModel": "RoPE tables kept as plain tensor attributes",
    "diffusers.Lumina2Transformer2DModel": "RoPE tables in a list attribute (a container)",
    "diffusers.ConsistencyDecoderVAE": "tensors inside the scheduler object it holds (a plain object)",
}
# Legacy weight norm: ``weight`` is a plain attribute its hook recomputes from parameters before every
# forward.  Nothing is lost without bufferfix; with it, nothing may be reported lost either.
WEIGHT_NORM = {"diffusers.MiniMaxMusic3Vocoder": "torch.nn.utils.weight_norm on every conv"}
CASES = harness.subset(sweep.cases(), list(SUBSET) + list(WEIGHT_NORM))


@functools.cache
def checked(name):
    return harness.check(CASES[name])


@pytest.mark.parametrize("name", list(SUBSET) + list(WEIGHT_NORM))
def test_subset_gives_the_reference_in_every_flow(name):
    harness.assert_exact_with_bufferfix(checked(name))  # and warns about nothing


@pytest.mark.parametrize("name", SUBSET)
def test_subset_is_broken_without_bufferfix(name):
    harness.assert_broken_without_bufferfix(checked(name))


@pytest.mark.slow
@pytest.mark.parametrize("case", sweep.cases(), ids=lambda case: case.name)
def test_every_model_class(case, sweep_results):
    harness.in_full_sweep(harness.check(case), sweep_results)
