import pytest

import bufferfix
from bufferfix.flows import uninitialised_memory_is_poisoned

# The tests that start processes, marked ``subprocess``: seconds each (torch imported afresh), most
# of the suite's time.  ``pytest -m "not slow and not subprocess"`` leaves them out (CONTRIBUTING.md);
# CI runs them.  A whole file where its tests do, else ``file::test``.  tests/test_markers.py checks
# that every test that starts one is here.
STARTS_PROCESSES = {
    "test_activation.py": "activation at import needs a fresh interpreter",
    "test_benchmarks_smoke.py": "runs benchmarks/run.py --quick",
    "test_cli.py": "the command line run as commands (python -m bufferfix, the console scripts)",
    "test_distributed.py": "torchrun jobs of two ranks",
    "test_release.py": "import, disable and enable in a fresh interpreter",
    "test_startup.py": "pip installs into scratch venvs, and fresh interpreters that start up with the .pth hook",
    "test_faults.py::test_a_meta_model_saved_and_loaded_in_a_fresh_interpreter_is_loud": "a fresh interpreter",
    "test_integrations.py::test_one_integration_switched_off_leaves_that_library_unpatched_and_the_others_patched":
        "integrations switched off at import",
    "test_integrations.py::test_a_torch_without_one_of_them_fails_loudly_and_runs_unpatched":
        "a torch lacking a private API, at import",
    "test_integrations.py::test_the_registry_is_read_off_the_integration_modules_without_importing_torch_or_a_library":
        "what reading the registry imports",
    "test_recording.py::test_subclass_of_a_torch_nn_leaf_class_made_before_import": "classes made before import",
    "test_signatures.py::test_signatures_are_those_without_bufferfix": "signatures before bufferfix is imported",
}


def pytest_collection_modifyitems(items):
    for item in items:
        name = item.path.name
        if name in STARTS_PROCESSES or "%s::%s" % (name, item.originalname) in STARTS_PROCESSES:
            item.add_marker(pytest.mark.subprocess)


@pytest.fixture(autouse=True)
def poisoned_memory():
    """Uninitialised memory reads as NaN / max-int, so a broken flow can never pass by luck."""
    with uninitialised_memory_is_poisoned():
        yield


@pytest.fixture
def without_bufferfix():
    """Run a test with bufferfix switched off (to show the flow is broken without it)."""
    with bufferfix.disabled():
        yield
    assert bufferfix.is_enabled()


@pytest.fixture
def strict():
    bufferfix.set_strict(True)
    try:
        yield
    finally:
        bufferfix.set_strict(None)


@pytest.fixture(scope="module")
def sweep_results(request):
    """A full sweep's results (``tests/test_<library>_sweep.py``, whose module names its ``sweep``):
    collected by its tests, summed up (and written as JSON) at the end of the module."""
    from sweeps import harness

    results = []
    yield results
    harness.report_at_end(request, request.module.sweep.LIBRARY, results)
