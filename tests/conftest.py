import pytest

import bufferfix
from bufferfix.flows import uninitialised_memory_is_poisoned


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
