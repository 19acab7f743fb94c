"""What a release promises about its dependency floors, checked on whatever this environment holds
(the floors leg of ``.ci/run`` installs exactly the floors declared in setup.cfg)."""
import os
import subprocess
import sys
import textwrap


def test_disable_and_enable_leave_no_wrapper_behind_and_log_nothing():
    # With wrapt older than the declared floor (no wrapt.unwrap_object), disable() leaves an inert
    # wrapper on every patched function and logs a warning for each: this fails there.
    code = textwrap.dedent("""
        import importlib, logging, sys
        import torch
        patched = [torch.nn.Module]
        for name in ("transformers.modeling_utils", "accelerate", "accelerate.big_modeling", "accelerate.utils",
                     "accelerate.utils.modeling"):
            try:
                patched.append(importlib.import_module(name))
            except ImportError:  # not installed: nothing of it to patch
                pass
        records = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = records.append
        logging.getLogger("bufferfix").addHandler(handler)
        originals = [dict(vars(owner)) for owner in patched]
        import bufferfix, wrapt

        def wrappers():
            return sorted("%s.%s" % (getattr(owner, "__name__", owner), name) for owner in patched
                          for name, value in vars(owner).items() if isinstance(value, wrapt.FunctionWrapper))

        assert "torch.nn.modules.module.Module.to_empty" in ["%s.%s" % (torch.nn.Module.__module__, w)
                                                             for w in wrappers()], wrappers()
        for _ in range(2):
            bufferfix.disable()
            assert wrappers() == [], wrappers()
            for owner, before in zip(patched, originals):
                after = dict(vars(owner))
                after.pop("__new__", None)  # torch.nn.Module.__new__: the documented inert pass-through
                after.pop("__signature__", None)  # inspect's view past that __new__: it stays with it
                before = {k: v for k, v in before.items() if k not in ("__new__", "__signature__")}
                assert after == before, set(after) ^ set(before)
            assert bufferfix.enable() and wrappers()
        assert [r.getMessage() for r in records] == []
        print("wrapt", wrapt.__version__, "patched", len(patched))
    """)
    result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, BUFFERFIX_DISABLE="0"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("wrapt ")
