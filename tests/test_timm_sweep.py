"""timm architectures through every meta flow and timm's own meta path (tests/sweeps/timm.py).

Each model is built normally as the reference (``torch.manual_seed(0)``) and then through every
flow of the sweep harness, ``timm.create_model(name, device="meta")`` -> ``to_empty`` -> load, and
that path followed by timm's own ``reinit_non_persistent_buffers``, with and without bufferfix;
non-persistent buffers, plain tensor attributes, tensors in container attributes, sharing, the
state dict and the outputs on an image must match bit for bit.

CI runs a fixed subset, one model per kind of non-persistent buffer, made small with
``create_model`` arguments (seconds, not minutes).  timm needs torchvision, which only installs
beside the CUDA torch 2.14 here, so these tests run in the ``.ci/run`` leg that installs
``.[test,test-timm]`` and skip elsewhere.  The full sweep (every architecture of
``timm.list_models()`` up to 60M parameters, default arguments, hours on 2 cores)::

    python -m pytest -m slow tests/test_timm_sweep.py
    cd tests && python -m sweeps.timm          # the same sweep as a command, with the summary
"""
import functools

import pytest

timm = pytest.importorskip("timm")
pytest.importorskip("accelerate")

from sweeps import harness  # noqa: E402
from sweeps import timm as sweep  # noqa: E402

# name -> (create_model arguments that make it small, what kind of buffer it covers)
SUBSET = {
    "swin_tiny_patch4_window7_224": (dict(embed_dim=32, depths=(2, 2), num_heads=(1, 2)),
                                     "attn_mask computed on a parameter's device; relative_position_index"),
    "swinv2_tiny_window8_256": (dict(embed_dim=32, depths=(2, 2), num_heads=(1, 2)),
                                "Swin-V2 attn_mask on a parameter's device; log-spaced relative coords table"),
    "swinv2_cr_tiny_224": (dict(embed_dim=32, depths=(2, 2), num_heads=(1, 2)),
                           "Swin-V2-CR relative_coordinates_log and attn_mask on a parameter's device"),
    "vit_small_patch16_rope_mixed_224": (dict(embed_dim=64, depth=2, num_heads=2),
                                         "RotaryEmbeddingMixed t_x / t_y made on the learnable freqs' device"),
    "eva02_tiny_patch14_224": (dict(depth=2), "EVA-02 rotary sin/cos table (RotaryEmbeddingCat)"),
    "beit_base_patch16_224": (dict(embed_dim=64, depth=2, num_heads=2), "BEiT relative_position_index"),
    "test_vit_relpos": ({}, "relative-position index buffers of vision_transformer_relpos"),
    "test_maxvit": ({}, "MaxViT / CoAtNet relative-position bias index (maxxvit)"),
    "levit_128s": ({}, "LeViT attention_bias_idxs (conv and subsample attention)"),
    "resnetblur18": (dict(layers=(1, 1, 1, 1)), "BlurPool filter buffers"),
}
FLOWS = list(harness.GENERIC_FLOWS) + [sweep.TIMM_META, sweep.TIMM_REINIT]


@functools.cache
def checked(name):
    return harness.check(sweep.case(name, model_kwargs=SUBSET[name][0]))


@pytest.mark.parametrize("name, flow", [(name, flow) for name in SUBSET for flow in FLOWS])
def test_subset_gives_the_reference(name, flow):
    result = checked(name)
    harness.assert_exact_with_bufferfix(result, flows=[flow])  # raising both ways: the flow does not apply
    assert result.parameters < 10_000_000, "no longer small, CI would slow down"
    assert result.inputs.startswith("compared"), result.inputs


@pytest.mark.parametrize("name", SUBSET)
def test_subset_is_broken_without_bufferfix(name):
    """Each model of the subset earns its place: its buffers are lost without bufferfix, both in the
    PyTorch-documented flow and in timm's own create_model(device="meta")."""
    result = checked(name)
    assert result.buffers
    harness.assert_broken_without_bufferfix(result, flows=["torch.device('meta')", sweep.TIMM_META])


@pytest.mark.parametrize("name", SUBSET)
def test_timm_reinit_non_persistent_buffers_is_the_normal_build_too(name):
    """timm's manual fix (without bufferfix) gives the same values as the normal build, so the
    reference bufferfix is held to is the one timm itself restores."""
    result = checked(name)
    assert result.fix_works(sweep.TIMM_REINIT), result.describe(enabled=False)


# --------------------------------------------------------------------------- the full sweep (slow)

ARCHITECTURES = sweep.architectures()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_architecture(name, sweep_results):
    harness.in_full_sweep(harness.check(sweep.case(name, ARCHITECTURES[name])), sweep_results, exact=True)
