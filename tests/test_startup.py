"""Activation without code changes: the start-up .pth hook (BUFFERFIX_AUTO) and bufferfix-run.

These tests install the package for real (``pip install .`` and ``pip install -e .``, from a
copy of the source tree) into scratch virtual environments and run fresh interpreters in
them.  Each venv is made once per session.  So that no test pays for installing torch, the
venvs see the test environment's torch and wrapt (and torch's own requirements) through a
directory of symlinks added to their path by a plain path .pth line, which is never
processed as a site directory: only the scratch venv's own site-packages are.
"""
import importlib.metadata
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bufferfix.activation import settings as _env

ROOT = Path(__file__).resolve().parent.parent
PTH_NAME = "bufferfix-startup.pth"
TIMEOUT = 120

STATE = "import sys; print('bufferfix' in sys.modules, 'wrapt' in sys.modules, '_bufferfix_startup' in sys.modules)"
PATCHED = "type(torch.nn.Module.__dict__['to_empty']).__name__ == 'FunctionWrapper'"
TRIGGERS = "sum(getattr(f, '_bufferfix_trigger', False) for f in sys.meta_path)"


def _pip_supports_python_option():
    try:
        version = importlib.metadata.version("pip")
    except importlib.metadata.PackageNotFoundError:
        return False
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2]) >= (22, 3)


pytestmark = pytest.mark.skipif(not _pip_supports_python_option(),
                                reason="needs pip >= 22.3 in the test environment (pip --python)")


def _link_dependencies(directory):
    """Symlink torch, wrapt, numpy if present and what they need (not pip/setuptools) from the test environment."""
    directory.mkdir()
    todo, seen = ["torch", "wrapt", "numpy"], {"pip", "setuptools", "bufferfix"}  # numpy: optional for torch
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [re.match(r"[A-Za-z0-9._-]+", req).group(0) for req in dist.requires or [] if "extra ==" not in req]
        for top in {f.parts[0] for f in dist.files or () if f.parts[0] not in ("..", "__pycache__")}:
            source, target = Path(dist.locate_file(top)), directory / top
            if not top.endswith(".pth") and source.exists() and not target.exists():
                target.symlink_to(source)


def clean_environment(**overrides):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BUFFERFIX_", "PYTHON")) and k not in ("VIRTUAL_ENV", "__PYVENV_LAUNCHER__")}
    env.update(overrides)
    return env


class Venv:
    """A scratch venv with bufferfix installed by pip, regular or editable."""

    def __init__(self, root, mode, source, dependencies):
        self.root, self.mode, self.source, self.dependencies = root, mode, source, dependencies
        self.python = str(root / "bin" / "python")
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=TIMEOUT)
        self.site_packages = Path(self.run("import sysconfig; print(sysconfig.get_path('purelib'))",
                                           check=True).stdout.strip())
        (self.site_packages / "zzz-bufferfix-tests-dependencies.pth").write_text(str(dependencies) + "\n")
        self.install()

    def pip(self, *args):
        return subprocess.run([sys.executable, "-m", "pip", "--python", self.python, "--disable-pip-version-check",
                               "--no-input", "-q", *args], capture_output=True, text=True, timeout=300,
                              env=clean_environment())

    def install(self):
        result = self.pip("install", "--no-deps", *(["-e"] if self.mode == "editable" else []), str(self.source))
        assert result.returncode == 0, result.stdout + result.stderr

    def ensure_installed(self):
        if not (self.site_packages / PTH_NAME).exists():
            self.install()

    @property
    def pth(self):
        return self.site_packages / PTH_NAME

    def run(self, code, *python_options, check=False, **environment):
        return self.command([self.python, *python_options, "-c", textwrap.dedent(code)], check=check, **environment)

    def command(self, argv, check=False, cwd=None, **environment):
        # never the working tree as cwd: `python -c` puts the cwd first on sys.path
        result = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd or str(self.root),
                                env=clean_environment(**environment))
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
        return result

    def out(self, code, *python_options, **environment):
        """stdout of a run that must succeed with nothing on stderr."""
        result = self.run(code, *python_options, check=True, **environment)
        assert result.stderr == "", result.stderr
        return result.stdout.split()


@pytest.fixture(scope="session")
def scratch(tmp_path_factory):
    base = tmp_path_factory.mktemp("startup")
    source = base / "source"  # a copy: building must not write into the working tree
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "tests"))
    _link_dependencies(base / "dependencies")
    return base, source


@pytest.fixture(scope="session", params=["regular", "editable"])
def venv(request, scratch):
    base, source = scratch
    return Venv(base / request.param, request.param, source, base / "dependencies")


@pytest.fixture
def env(venv):
    venv.ensure_installed()
    return venv


# --- the installed hook ----------------------------------------------------------------------------


def test_the_pth_file_is_installed_recorded_and_one_import_line(env):
    lines = env.pth.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("import os, sys;")
    record = next(env.site_packages.glob("bufferfix-*.dist-info")) / "RECORD"
    assert re.search(r"^%s,sha256=[-_A-Za-z0-9]{43},\d+$" % re.escape(PTH_NAME), record.read_text(), re.M)
    expected = env.site_packages / "bufferfix" if env.mode == "regular" else env.source / "bufferfix"
    assert env.out("import bufferfix, os; print(os.path.dirname(bufferfix.__file__))") == [str(expected)]


@pytest.mark.parametrize("value", [None, "", "0", "off", " False "])
def test_unset_or_false_imports_nothing_at_start_up(env, value):
    extra = {} if value is None else {"BUFFERFIX_AUTO": value}
    assert env.out(STATE + "; print(%s)" % TRIGGERS, **extra) == ["False", "False", "False", "0"]


def test_set_arms_a_trigger_and_imports_nothing_heavy_until_torch(env):
    code = STATE + "; import json, collections, email.parser; " + STATE + "; print(%s)" % TRIGGERS
    assert env.out(code, BUFFERFIX_AUTO="1") == ["False", "False", "True"] * 2 + ["1"]


def test_a_failed_torch_import_probe_imports_nothing_and_stays_armed(env):
    out = env.out("""
        import sys
        sys.path[:] = [entry for entry in sys.path if not entry.endswith("dependencies")]
        try:
            import torch
        except ImportError:
            print("no-torch")
        %s
        print(%s)
    """ % (STATE, TRIGGERS), BUFFERFIX_AUTO="1")
    assert out == ["no-torch", "False", "False", "True", "1"]


def test_set_patches_torch_when_it_is_imported_and_restores_buffers(env):
    result = env.run("""
        import sys
        from torch import nn   # the first torch import, through a submodule
        import torch
        print(%s, %s, 'bufferfix' in sys.modules)
        class Rotary(nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8), persistent=False)
        reference = Rotary()
        with torch.device("meta"):
            model = Rotary()
        model.to_empty(device="cpu")
        print(torch.equal(model.inv_freq, reference.inv_freq))
    """ % (PATCHED, TRIGGERS), check=True, BUFFERFIX_AUTO="yes", BUFFERFIX_LOG_LEVEL="DEBUG")
    assert result.stdout.split() == ["True", "0", "True", "True"], result.stderr
    debug = [line for line in result.stderr.splitlines() if line.startswith("DEBUG bufferfix: ")]
    assert debug[:2] == ["DEBUG bufferfix: enabled at start-up (BUFFERFIX_AUTO) in process %s" % debug[0].split()[-1],
                         "DEBUG bufferfix: torch.nn.Module instrumented"], result.stderr


def test_a_program_importing_bufferfix_itself_takes_over(env):
    out = env.out("import sys, bufferfix; print(%s, bufferfix.is_enabled(), 'wrapt' in sys.modules)" % TRIGGERS,
                  BUFFERFIX_AUTO="1")
    assert out == ["0", "True", "True"]


def test_disable_beats_auto_and_import(env):
    out = env.out("import sys, torch; print(%s, %s, 'wrapt' in sys.modules, 'bufferfix' in sys.modules); "
                  "import bufferfix; print(bufferfix.enable(), %s)" % (PATCHED, TRIGGERS, PATCHED),
                  BUFFERFIX_AUTO="1", BUFFERFIX_DISABLE="on")
    assert out == ["False", "0", "False", "False", "False", "False"]


def test_invalid_values_warn_once_and_never_crash(env):
    result = env.run(STATE + "; print(%s)" % TRIGGERS, check=True, BUFFERFIX_AUTO="maybe")
    assert result.stdout.split() == ["False", "False", "True", "0"]  # not armed
    assert result.stderr.count("BUFFERFIX_AUTO='maybe'") == 1, result.stderr
    result = env.run("import torch; print(%s)" % PATCHED, check=True, BUFFERFIX_AUTO="1",
                     BUFFERFIX_LOG_LEVEL="loud", BUFFERFIX_DISABLE="perhaps")
    assert result.stdout.split() == ["True"]  # an invalid switch keeps its default: not disabled
    assert result.stderr.count("BUFFERFIX_LOG_LEVEL='loud'") == 1, result.stderr
    assert result.stderr.count("BUFFERFIX_DISABLE='perhaps'") == 1, result.stderr
    assert len(result.stderr.splitlines()) == 2, result.stderr


def test_a_failure_is_reported_once_and_the_program_goes_on(env, tmp_path):
    (tmp_path / "wrapt").mkdir()
    (tmp_path / "wrapt" / "__init__.py").write_text("raise RuntimeError('broken wrapt')\n")
    result = env.run("import torch; import torch.nn; print(%s, torch.ones(2).sum().item())" % PATCHED,
                     BUFFERFIX_AUTO="1", PYTHONPATH=str(tmp_path))
    assert result.returncode == 0 and result.stdout.split() == ["False", "2.0"], result.stderr
    assert result.stderr.count("RuntimeError: broken wrapt") == 1 and len(result.stderr.splitlines()) == 1


def test_the_pth_file_processed_twice_arms_one_trigger_and_patches_once(env):
    out = env.out("""
        import site, sys
        site.addsitedir(%r)              # processes every .pth file of site-packages again
        exec(open(%r).read())            # and ours once more
        print(%s)
        import torch
        wrapper = torch.nn.Module.__dict__["to_empty"]
        print(%s, hasattr(wrapper.__wrapped__, "__wrapped__"))
    """ % (str(env.site_packages), str(env.pth), TRIGGERS, PATCHED), BUFFERFIX_AUTO="1")
    assert out == ["1", "True", "False"]


def test_python_S_E_and_I_do_not_activate(env):
    assert env.out(STATE, "-S", BUFFERFIX_AUTO="1") == ["False", "False", "False"]  # no site: no .pth at all
    for option in ("-E", "-I"):  # site runs, but these ignore the environment: BUFFERFIX_* included
        assert env.out(STATE + "; print(%s)" % TRIGGERS, option, BUFFERFIX_AUTO="1") == ["False"] * 3 + ["0"]


# --- the launcher (the bootstrap is in site-packages or in the source tree: both modes once) ------------------------

REGULAR_ONLY = pytest.mark.parametrize("venv", ["regular"], indirect=True)

SPAWN_SCRIPT = """
import multiprocessing, os, sys

def child(queue):
    import torch
    queue.put(%s)

if __name__ == "__main__":
    print(os.environ["BUFFERFIX_AUTO"], "wrapt" in sys.modules, %s)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=child, args=(queue,))
    process.start()
    print(queue.get(timeout=100))
    process.join()
""" % (PATCHED, TRIGGERS)


def test_bufferfix_run_activates_in_the_command_and_its_spawned_children(env, tmp_path):
    (tmp_path / "spawn.py").write_text(SPAWN_SCRIPT)
    result = env.command([str(env.root / "bin" / "bufferfix-run"), env.python, "spawn.py"], check=True,
                         cwd=str(tmp_path))
    assert result.stdout.split() == ["1", "False", "1", "True"], result.stderr
    assert result.stderr == ""


@REGULAR_ONLY
def test_python_m_bufferfix_run_chains_an_existing_sitecustomize_and_keeps_the_exit_status(env, tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import os\nos.environ['THEIRS'] = 'ran'\n")
    result = env.command([env.python, "-m", "bufferfix", "run", "--", env.python, "-c", textwrap.dedent("""
        import os, sys, torch
        print(os.environ.get("THEIRS"), sys.modules["sitecustomize"].__file__ == %r, %s)
        sys.exit(3)
    """ % (str(tmp_path / "sitecustomize.py"), PATCHED))], PYTHONPATH=str(tmp_path))
    assert result.returncode == 3 and result.stdout.split() == ["ran", "True", "True"], result.stderr


@REGULAR_ONLY
def test_an_error_in_the_chained_sitecustomize_is_reported_as_site_would(env, tmp_path):
    (tmp_path / "sitecustomize.py").write_text("raise ValueError('theirs is broken')\n")
    result = env.command([str(env.root / "bin" / "bufferfix-run"), env.python, "-c", STATE + "; print(%s)" % TRIGGERS],
                         PYTHONPATH=str(tmp_path))
    assert result.returncode == 0 and result.stdout.split() == ["False", "False", "True", "1"]
    assert "Error in sitecustomize" in result.stderr and "ValueError: theirs is broken" in result.stderr


@REGULAR_ONLY
def test_bufferfix_run_usage_and_a_missing_command(env):
    launcher = str(env.root / "bin" / "bufferfix-run")
    assert env.command([launcher]).returncode == 2
    assert "usage: bufferfix-run" in env.command([launcher, "--help"], check=True).stdout
    result = env.command([launcher, "no-such-command-bufferfix"])
    assert result.returncode == 127 and "no-such-command-bufferfix" in result.stderr


TORCHRUN_SCRIPT = """
import os, torch, torch.distributed as dist
dist.init_process_group("gloo")
flags = [None] * dist.get_world_size()
dist.all_gather_object(flags, %s)
if dist.get_rank() == 0:
    print("workers patched:", flags)
dist.destroy_process_group()
""" % PATCHED


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@REGULAR_ONLY
def test_bufferfix_run_torchrun_two_workers(env, tmp_path):
    (tmp_path / "worker.py").write_text(TORCHRUN_SCRIPT)
    # `torchrun` is `python -m torch.distributed.run`; torch is not installed in the scratch venv's bin/
    result = env.command([str(env.root / "bin" / "bufferfix-run"), env.python, "-m", "torch.distributed.run",
                          "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                          "worker.py"], cwd=str(tmp_path), OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "workers patched: [True, True]" in result.stdout


# --- uninstall (any test after it reinstalls) ------------------------------------------------------


def test_pip_uninstall_removes_the_pth_file(env):
    result = env.pip("uninstall", "-y", "bufferfix")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not env.pth.exists()
    assert env.out(STATE, BUFFERFIX_AUTO="1") == ["False", "False", "False"]


# --- the variables, parsed (no subprocess) ---------------------------------------------------------


def test_log_level_parsing(capsys):
    _env._already_complained.discard(_env.LOG_LEVEL)
    assert [_env.log_level({_env.LOG_LEVEL: value}) for value in ("debug", " INFO ", "Warning", "15", "")] == \
        [10, 20, 30, 15, None]
    assert _env.log_level({}) is None
    assert _env.log_level({_env.LOG_LEVEL: "chatty"}) is None and _env.log_level({_env.LOG_LEVEL: "x"}) is None
    assert capsys.readouterr().err.count("BUFFERFIX_LOG_LEVEL") == 1


def test_unknown_disabled_integration_names_warn_naming_them_and_the_known_names(capsys):
    from bufferfix.activation import registry

    known = registry.known_names()
    assert {"torch_nn", "transformers", "accelerate"} <= known
    for value, kept, says in [("torch_nn,foo", {"torch_nn"}, "unknown name 'foo', ignored"),
                              ("transformer", set(), "unknown name 'transformer' (did you mean 'transformers'?)")]:
        _env._already_complained.discard(_env.DISABLED_INTEGRATIONS)
        assert _env.names(_env.DISABLED_INTEGRATIONS, {_env.DISABLED_INTEGRATIONS: value}, known=known) == kept
        err = capsys.readouterr().err
        assert says in err and "the known names are %s" % ", ".join(sorted(known)) in err, err
    _env._already_complained.discard(_env.DISABLED_INTEGRATIONS)
    assert _env.names(_env.DISABLED_INTEGRATIONS, {_env.DISABLED_INTEGRATIONS: " Accelerate , peft"},
                      known=known) == {"accelerate", "peft"}
    assert capsys.readouterr().err == ""


def _import_bufferfix(**variables):
    """stderr of ``import bufferfix`` in a fresh interpreter with ``variables`` set (torch is not imported)."""
    result = subprocess.run([sys.executable, "-c", "import bufferfix"], capture_output=True, text=True,
                            timeout=TIMEOUT, cwd=str(ROOT), env=dict(clean_environment(**variables),
                                                                     PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr
    return result.stderr


@pytest.mark.parametrize("value, unknown", [("torch_nn,foo", "'foo'"), ("transformer", "'transformer'")])
def test_an_unknown_disabled_integration_is_reported_at_start_up(value, unknown):
    lines = _import_bufferfix(BUFFERFIX_DISABLED_INTEGRATIONS=value).splitlines()
    assert len(lines) == 1 and unknown in lines[0] and "torch_nn, torchtune, transformers" in lines[0], lines


@pytest.mark.parametrize("value", ["2", "strict"])
def test_an_invalid_strict_value_is_reported_at_start_up(value):
    assert _import_bufferfix(BUFFERFIX_STRICT=value) == \
        "bufferfix: ignoring BUFFERFIX_STRICT=%r (expected 1/true/yes/on or 0/false/no/off); using 0\n" % value
    assert _import_bufferfix(BUFFERFIX_STRICT="1", BUFFERFIX_DISABLED_INTEGRATIONS="accelerate") == ""
