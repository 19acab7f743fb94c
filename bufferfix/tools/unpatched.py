"""The same work in a fresh interpreter, with bufferfix on or off.

With ``BUFFERFIX_DISABLE=1`` the child is genuinely unpatched: bufferfix never touches torch
there, which no in-process ``disable()`` can promise for everything already recorded.  The
child is ``python -m MODULE ARGUMENTS...``; it ends its output with one JSON line written by
:func:`answer`, which also says whether bufferfix was on in it, and :meth:`Child.result` checks
that it was what was asked.  Shared by the doctor and the demo.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any


class ChildFailed(Exception):
    """The child exited with an error, printed no answer, or had bufferfix in the wrong state."""

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr


def child_environment(bufferfix_on: bool) -> dict[str, str]:
    """``BUFFERFIX_DISABLE`` set accordingly, and this interpreter's own import paths (a
    ``module:callable`` target importable here must be importable there)."""
    environment = dict(os.environ, BUFFERFIX_DISABLE="0" if bufferfix_on else "1")
    system = tuple(os.path.realpath(p) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix})
    extra = []
    for entry in sys.path:
        entry = os.path.realpath(entry or os.getcwd())
        if not entry.startswith(system) and os.path.isdir(entry) and entry not in extra:
            extra.append(entry)
    if environment.get("PYTHONPATH"):
        extra.append(environment["PYTHONPATH"])
    environment["PYTHONPATH"] = os.pathsep.join(extra)
    return environment


class Child:
    """``python -m module *arguments`` started now, in a fresh interpreter; it runs while this
    one works, and :meth:`result` collects it."""

    def __init__(self, module: str, arguments: Sequence[str], bufferfix_on: bool = False) -> None:
        self.bufferfix_on = bufferfix_on
        self.name = "the %s interpreter" % ("bufferfix" if bufferfix_on else "BUFFERFIX_DISABLE=1")
        self.process = subprocess.Popen([sys.executable, "-m", module, *arguments],
                                        env=child_environment(bufferfix_on), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)

    def result(self) -> dict[str, Any]:  # a JSON object: values of any kind
        """The child's JSON answer (a dict), or :class:`ChildFailed`."""
        stdout, stderr = self.process.communicate()
        lines = stdout.strip().splitlines()
        if self.process.returncode != 0 or not lines:
            tail = (stderr.strip().splitlines() or ["no output"])[-1]
            raise ChildFailed("%s failed (exit %d): %s" % (self.name, self.process.returncode, tail), stderr)
        try:
            answer = json.loads(lines[-1])
        except ValueError:
            raise ChildFailed("%s printed no JSON answer: %s" % (self.name, lines[-1][:200]), stderr) from None
        if answer.get("bufferfix_enabled") is not self.bufferfix_on:
            raise ChildFailed("bufferfix was %s in %s" % ("on" if answer.get("bufferfix_enabled") else "off",
                                                        self.name), stderr)
        return answer

    def kill(self) -> None:
        self.process.kill()
        self.process.communicate()


def answer(payload: Mapping[str, object]) -> None:
    """In the child: print ``payload`` (a JSON-able dict) as the answer, saying whether bufferfix is on."""
    import bufferfix

    print(json.dumps(dict(payload, bufferfix_enabled=bufferfix.is_enabled())))
