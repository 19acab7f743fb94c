"""Activation: import, enable/disable, the disable switch. Run in fresh interpreters."""
import os
import subprocess
import sys
import textwrap


def run_python(code, **environment):
    env = dict(os.environ, **environment)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_disable_restores_the_original_functions_exactly():
    run_python("""
        import torch
        from torch import nn
        before = dict(nn.Module.__dict__)
        import bufferfix
        assert nn.Module.__dict__["to_empty"] is not before["to_empty"]
        assert nn.Module.__dict__["to"] is not before["to"]
        assert "__deepcopy__" in nn.Module.__dict__
        bufferfix.disable()
        after = dict(nn.Module.__dict__)
        after.pop("__new__")  # the documented inert pass-through: CPython cannot remove it
        after.pop("__signature__")  # inspect's view past the __new__s: it stays with them
        assert after == before, set(after.items()) ^ set(before.items())
        assert not nn.modules.module._global_parameter_registration_hooks
        assert not nn.modules.module._global_module_registration_hooks
        bufferfix.enable()
        assert nn.Module.__dict__["to_empty"] is not before["to_empty"]
    """)


def test_import_and_enable_are_idempotent():
    run_python("""
        import torch, importlib
        import bufferfix
        wrapper = torch.nn.Module.__dict__["to_empty"]
        bufferfix.enable(); bufferfix.enable()
        assert torch.nn.Module.__dict__["to_empty"] is wrapper
        assert wrapper.__wrapped__ is not None and not hasattr(wrapper.__wrapped__, "__wrapped__")
        assert not torch.nn.modules.module._global_parameter_registration_hooks  # replays patch, see recipes
    """)


def test_disable_switch_beats_import():
    out = run_python("""
        import bufferfix, torch
        from torch import nn
        print(bufferfix.enable(), type(nn.Module.__dict__["to_empty"]).__name__, "__deepcopy__" in nn.Module.__dict__)
    """, BUFFERFIX_DISABLE="yes")
    assert out.split() == ["False", "function", "False"]


def test_invalid_switch_value_warns_and_keeps_the_default():
    result = subprocess.run([sys.executable, "-c", "import bufferfix, torch; print(bufferfix.is_enabled())"],
                            env=dict(os.environ, BUFFERFIX_DISABLE="maybe"), capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "True"
    assert "BUFFERFIX_DISABLE='maybe'" in result.stderr


def test_import_does_not_import_torch_and_patches_it_later():
    out = run_python("""
        import sys, bufferfix
        print("torch" in sys.modules)
        import torch
        print(type(torch.nn.Module.__dict__["to_empty"]).__name__)
    """)
    assert out.split() == ["False", "FunctionWrapper"]


def test_importing_a_bufferfix_submodule_before_torch_still_patches_torch():
    # torch's post-import hook must not find the integration half-initialised (it would leave
    # torch unpatched, with only a log line to say so).
    for submodule in ("bufferfix.integrations.torch_nn", "bufferfix.mechanism.recipes"):
        run_python("""
            import sys, importlib
            importlib.import_module(%r)
            import torch
            from bufferfix.integrations import torch_nn
            assert torch_nn.INTEGRATION.active
            assert type(torch.nn.Module.__dict__["to_empty"]).__name__ == "FunctionWrapper"
        """ % submodule)
