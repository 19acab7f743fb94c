"""Bit-for-bit comparison of a materialised model against a normally built reference."""
import torch


def bits(tensor):
    """The raw bytes of a tensor: NaN == NaN, and -0.0 != 0.0, unlike torch.equal."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def identical(a, b):
    return (a.dtype == b.dtype and a.device == b.device and a.shape == b.shape
            and not a.is_meta and torch.equal(bits(a), bits(b)))


def non_persistent_buffers(model):
    return {
        "%s.%s" % (path, name) if path else name: tensor
        for path, module in model.named_modules(remove_duplicate=False)
        for name, tensor in module._buffers.items()
        if name in module._non_persistent_buffers_set and tensor is not None
    }


def tensor_attributes(model):
    return {
        "%s.%s" % (path, name) if path else name: value
        for path, module in model.named_modules()
        for name, value in vars(module).items()
        if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter)
    }


def sharing(tensors):
    """Which names hold the same tensor object: {name: first name holding that object}."""
    first = {}
    return {name: first.setdefault(id(tensor), name) for name, tensor in tensors.items()}


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
