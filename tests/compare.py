"""Assertions that a materialised model matches a normally built reference, bit for bit.

The comparison itself is :mod:`bufferfix.tools.compare`, shared with the doctor; this module adds
the test suite's assertions on top of it.
"""
from bufferfix.tools.compare import (  # noqa: F401  (re-exported for the tests)
    bits,
    identical,
    non_persistent_buffers,
    sharing,
    tensor_attributes,
)


def broken_buffers(model, reference):
    """Names of non-persistent buffers that differ from the reference in value, dtype or device."""
    ours, theirs = non_persistent_buffers(model), non_persistent_buffers(reference)
    assert ours.keys() == theirs.keys()
    return sorted(name for name in theirs if not identical(ours[name], theirs[name]))


def assert_matches_reference(model, reference):
    assert broken_buffers(model, reference) == []
    assert model.state_dict().keys() == reference.state_dict().keys()
    for (name, ours), (_, theirs) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert identical(ours, theirs), name
    ours, theirs = tensor_attributes(model), tensor_attributes(reference)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert identical(ours[name], theirs[name]), name
    everything = lambda m: {**{"buffer " + k: v for k, v in m.named_buffers(remove_duplicate=False)},  # noqa: E731
                            **{"attribute " + k: v for k, v in tensor_attributes(m).items()}}
    assert sharing(everything(model)) == sharing(everything(reference))

# What a model's first forward (or a library's end of loading) does: bufferfix gives its verdicts on
# the values it could not recover, in an UnrecoverableBufferWarning attributed to the caller's line.
from bufferfix.integrations.base import loading_ended as loading_ends  # noqa: E402,F401
