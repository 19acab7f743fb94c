"""Build script: everything is in setup.cfg, except the start-up ``.pth`` file.

``bufferfix-startup.pth`` is installed at the top of site-packages, next to the ``bufferfix``
package, so that ``BUFFERFIX_AUTO=1`` activates bufferfix in every Python process of the
environment.  A .pth file is not package data, so two commands are extended to ship it:

- ``build_py`` writes it at the root of the build tree, so regular wheels (``pip install .``,
  ``python -m build``) carry it and list it in their RECORD, and ``pip uninstall`` removes it;
- ``editable_wheel`` (PEP 660, ``pip install -e .``) adds it to the editable wheel, with its
  RECORD line, since editable wheels carry only a path/finder hook, not the build tree.

The file's single line runs at every interpreter start-up, so it must stay cheap: with
``BUFFERFIX_AUTO`` unset (or a false value) it reads one environment variable and imports
nothing.  Otherwise it loads ``bufferfix/_startup.py`` by path, without importing the
``bufferfix`` package (whose import would import wrapt), and arms it.  Its name sorts after
setuptools' ``__editable__.*.pth``, which must run first for an editable install to be found.
"""
import base64
import csv
import hashlib
import io
import os
import zipfile

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "bufferfix-startup.pth"

# Runs only when the condition below holds: with BUFFERFIX_AUTO unset the line costs a dict lookup.
# importlib.machinery, not importlib.util (which imports contextlib, collections...: ~2 ms).
_PTH_CODE = """\
try:
    m = sys.modules.get("_bufferfix_startup")
    if m is None:
        from importlib.machinery import SourceFileLoader
        s = None
        for f in sys.meta_path:
            s = getattr(f, "find_spec", None) and f.find_spec("bufferfix", None)
            if s:
                break
        if not s or not s.submodule_search_locations:
            raise ImportError("the bufferfix package is not importable")
        p = os.path.join(list(s.submodule_search_locations)[0], "_startup.py")
        m = type(sys)("_bufferfix_startup")
        m.__file__ = p
        SourceFileLoader(m.__name__, p).exec_module(m)
        sys.modules[m.__name__] = m
    m.install()
except Exception as e:
    sys.stderr.write("bufferfix: BUFFERFIX_AUTO is set but the start-up hook failed (%s: %s); bufferfix is not active\\n" % (type(e).__name__, e))
"""
_PTH_CONDITION = ('not sys.flags.ignore_environment and os.environ.get("BUFFERFIX_AUTO", "").strip().lower() '
                  'not in ("", "0", "false", "no", "off")')
# site.py executes a .pth line only if it starts with "import"; the whole hook must be one line.
PTH_CONTENT = "import os, sys; %s and exec(%r)\n" % (_PTH_CONDITION, _PTH_CODE)


class build_py_with_pth(build_py):
    """``build_py`` that also writes the start-up .pth file at the root of the build tree."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):  # editable wheels: see editable_wheel_with_pth
            path = os.path.join(self.build_lib, PTH_NAME)
            self.mkpath(self.build_lib)
            with open(path, "w", encoding="utf-8") as file:
                file.write(PTH_CONTENT)

    def get_outputs(self, include_bytecode=1):
        outputs = super().get_outputs(include_bytecode)
        if not getattr(self, "editable_mode", False):
            outputs.append(os.path.join(self.build_lib, PTH_NAME))
        return outputs


def _add_to_wheel(wheel_path, name, data):
    """Rewrite the wheel at ``wheel_path`` with the file ``name`` added and listed in its RECORD."""
    with zipfile.ZipFile(wheel_path) as wheel:
        entries = [(info, wheel.read(info)) for info in wheel.infolist() if info.filename != name]
    record = next(info.filename for info, _ in entries if info.filename.endswith(".dist-info/RECORD"))
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode("ascii")
    temporary = wheel_path + ".tmp"
    with zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED) as wheel:
        wheel.writestr(name, data)
        for info, content in entries:
            if info.filename == record:
                rows = [row for row in csv.reader(io.StringIO(content.decode("utf-8"))) if row and row[0] != name]
                rows.insert(len(rows) - 1 if rows and rows[-1][0] == record else len(rows),
                            [name, "sha256=" + digest, str(len(data))])
                text = io.StringIO()
                csv.writer(text, lineterminator="\n").writerows(rows)
                content = text.getvalue().encode("utf-8")
            wheel.writestr(info, content)
    os.replace(temporary, wheel_path)


cmdclass = {"build_py": build_py_with_pth}

try:
    from setuptools.command.editable_wheel import editable_wheel  # setuptools >= 64 (PEP 660)
except ImportError:  # pragma: no cover - pyproject.toml requires setuptools >= 64
    editable_wheel = None

if editable_wheel is not None:
    class editable_wheel_with_pth(editable_wheel):
        """``editable_wheel`` that also puts the start-up .pth file into the editable wheel."""

        def run(self):
            super().run()
            name = self.distribution.get_name().replace("-", "_")
            wheels = [os.path.join(str(self.dist_dir), entry) for entry in os.listdir(str(self.dist_dir))
                      if entry.startswith(name + "-") and entry.endswith(".whl") and ".editable-" in entry]
            if not wheels:
                raise RuntimeError("bufferfix setup.py: no editable wheel found in %s" % self.dist_dir)
            for wheel_path in wheels:
                _add_to_wheel(wheel_path, PTH_NAME, PTH_CONTENT.encode("utf-8"))

    cmdclass["editable_wheel"] = editable_wheel_with_pth

setup(cmdclass=cmdclass)
