"""The ``subprocess`` marker (tests/conftest.py) is on every test that starts a process, so that the
fast loop, ``pytest -m "not slow and not subprocess"``, stays fast."""
import ast
from pathlib import Path

from conftest import STARTS_PROCESSES

TESTS = Path(__file__).resolve().parent
# what code that starts a process names: subprocess.run / Popen, sys.executable, multiprocessing, os.fork
STARTS = {"subprocess", "Popen", "executable", "multiprocessing", "fork", "execv", "execve", "spawn"}


def names_in(node):
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}


def process_starting_tests(path):
    """The test functions of a file that name something that starts a process, directly or through the
    file's own functions, classes and fixtures (by name, as arguments or calls)."""
    tree = ast.parse(path.read_text())
    definitions = {node.name: node for node in tree.body
                   if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    starting = {name for name, node in definitions.items() if names_in(node) & STARTS}
    grown = True
    while grown:
        grown = False
        for name, node in definitions.items():
            used = names_in(node) | {argument.arg for argument in ast.walk(node) if isinstance(argument, ast.arg)}
            if name not in starting and used & starting:
                starting.add(name)
                grown = True
    return {name for name in starting if name.startswith("test_")}


def test_every_test_that_starts_a_process_is_marked():
    unmarked = ["%s::%s" % (path.name, name) for path in sorted(TESTS.glob("test_*.py"))
                if path.name not in STARTS_PROCESSES
                for name in sorted(process_starting_tests(path))
                if "%s::%s" % (path.name, name) not in STARTS_PROCESSES]
    assert unmarked == [], "add them to STARTS_PROCESSES in tests/conftest.py"


def test_every_listed_test_exists_and_starts_a_process():
    for entry in STARTS_PROCESSES:
        file, _, name = entry.partition("::")
        found = process_starting_tests(TESTS / file)
        assert (name in found) if name else found, entry


def test_the_check_sees_a_process_started_through_a_helper(tmp_path):
    path = tmp_path / "test_example.py"
    path.write_text("import subprocess, sys\n"
                    "def run(code):\n    return subprocess.run([sys.executable, '-c', code])\n"
                    "def test_in_a_fresh_interpreter():\n    run('pass')\n"
                    "def test_here():\n    assert 1 + 1 == 2\n")
    assert process_starting_tests(path) == {"test_in_a_fresh_interpreter"}
