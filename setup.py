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
nothing.  Otherwise it imports ``_bufferfix_startup`` (standard library only, never the
``bufferfix`` package, whose import would import wrapt) and arms it.  Its name sorts after
setuptools' ``__editable__.*.pth``, which must run first for an editable install to be found.
"""
import base64
import csv
import hashlib
import io
import os
import zipfile

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

PTH_NAME = "bufferfix-startup.pth"

# site.py executes a .pth line only if it starts with "import"; with BUFFERFIX_AUTO unset or false
# the line costs one environment lookup.  _bufferfix_startup is bufferfix/activation/startup,
# installed top-level (setup.cfg) so that it is imported without the bufferfix package; it
# contains its own failures.
PTH_CONTENT = ('import os, sys; not sys.flags.ignore_environment and os.environ.get("BUFFERFIX_AUTO", "").strip().lower() '
               'not in ("", "0", "false", "no", "off") and __import__("_bufferfix_startup").install()\n')


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

# bufferfix/activation/startup is installed as the top-level _bufferfix_startup (package_dir in
# setup.cfg), so that start-up can import it without importing the bufferfix package.
PACKAGES = find_packages(include=["bufferfix", "bufferfix.*"], exclude=["bufferfix.activation.startup"])

setup(cmdclass=cmdclass, packages=PACKAGES + ["_bufferfix_startup"])
