"""The integration contract: every registered integration follows it, each can be switched off alone,
and every torch private API bufferfix uses resolves on the torch under test."""
import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import bufferfix
from bufferfix.activation import registry
from bufferfix.integrations.base import Integration


@pytest.mark.parametrize("integration", registry.integrations(), ids=lambda integration: integration.name)
def test_every_registered_integration_follows_the_contract(integration):
    module = importlib.import_module(type(integration).__module__)
    assert isinstance(integration, Integration) and module.INTEGRATION is integration
    assert integration.name == module.__name__.rpartition(".")[2]  # as BUFFERFIX_DISABLED_INTEGRATIONS lists it
    assert integration.active == (integration.target in sys.modules)  # patched exactly when its target is imported
    assert [i.name for i in registry.integrations()].count(integration.name) == 1


def test_the_registry_is_read_off_the_integration_modules_without_importing_torch_or_a_library():
    """Every module of bufferfix.integrations is an integration, found without a list written
    elsewhere, and reading them imports neither torch nor any library they patch."""
    code = """
        import pkgutil, sys
        import bufferfix.integrations as package
        from bufferfix.activation import registry
        modules = sorted(info.name for info in pkgutil.iter_modules(package.__path__) if info.name != "base")
        assert sorted(i.name for i in registry.integrations()) == modules, modules
        libraries = [i.target.split(".")[0] for i in registry.integrations()]
        assert not [name for name in libraries if name in sys.modules], [n for n in libraries if n in sys.modules]
        print("ok")
    """
    assert _run(code) == ["ok"]


def test_instrument_and_uninstrument_are_idempotent_and_reversible():
    from bufferfix.integrations import torch_nn

    integration = torch_nn.INTEGRATION
    wrapped = torch.nn.Module.__dict__["to_empty"]
    integration.instrument(torch)  # already active: nothing changes
    assert torch.nn.Module.__dict__["to_empty"] is wrapped
    with bufferfix.disabled():
        assert not integration.active
        assert type(torch.nn.Module.__dict__["to_empty"]).__name__ == "function"  # really unwrapped
        integration.uninstrument()  # twice: a no-op
    assert integration.active and type(torch.nn.Module.__dict__["to_empty"]).__name__ == "FunctionWrapper"


def test_disabled_restores_the_previous_state():
    with bufferfix.disabled():
        assert not bufferfix.is_enabled()
        with bufferfix.disabled():
            assert not bufferfix.is_enabled()
        assert not bufferfix.is_enabled()  # the inner block does not switch on what the outer switched off
    assert bufferfix.is_enabled()


def _run(code, **environment):
    env = {key: value for key, value in os.environ.items() if not key.startswith("BUFFERFIX_")}
    env.update(environment)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


PATCHED = """
import bufferfix, torch, accelerate, accelerate.big_modeling, transformers.modeling_utils as mu
kind = lambda value: type(value).__name__
print(kind(torch.nn.Module.__dict__["to_empty"]), kind(accelerate.big_modeling.dispatch_model),
      kind(mu.PreTrainedModel.__dict__.get("_move_missing_keys_from_meta_to_device", "absent")))
"""


def test_one_integration_switched_off_leaves_that_library_unpatched_and_the_others_patched():
    pytest.importorskip("accelerate")
    pytest.importorskip("transformers")
    everything = _run(PATCHED)
    assert everything[:2] == ["FunctionWrapper", "FunctionWrapper"]
    off = _run(PATCHED, BUFFERFIX_DISABLED_INTEGRATIONS=" Accelerate ")
    assert off[:2] == ["FunctionWrapper", "function"]
    assert off[2] == everything[2]  # transformers: patched exactly as before (a wrapper on 5.x, absent on 4.x)


def test_every_torch_private_api_resolves_on_this_torch():
    from bufferfix.mechanism import compat

    missing = [name for name in compat.NAMES if getattr(compat, name, None) is None]
    assert missing == [], "torch %s lacks %s" % (torch.__version__, missing)
    assert compat.device_context() is None
    with torch.device("meta"):
        assert isinstance(compat.device_context(), compat.DeviceContext)


def test_a_torch_without_one_of_them_fails_loudly_and_runs_unpatched():
    out = _run("""
        import warnings, torch
        del torch._C._len_torch_function_stack          # as a future torch might
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import bufferfix
        print(type(torch.nn.Module.__dict__["to_empty"]).__name__)
        print(any("_len_torch_function_stack" in str(w.message) for w in caught))
    """)
    assert out == ["function", "True"]
