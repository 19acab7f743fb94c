"""inspect.signature of module classes with bufferfix active is what it is without bufferfix.

bufferfix puts ``__new__``s on module classes (C's ``object.__new__`` on torch.nn's leaf classes,
the recording hook on ``nn.Module`` and on classes made from a leaf class), and ``inspect`` can
read the constructor's signature off them: on Python 3.10 ``inspect.signature(nn.Linear)``
raised ``ValueError``, and on every version a subclass of a leaf class gave ``(*args, **kwargs)``.
Libraries that build objects from signatures (Lightning's CLI, jsonargparse, hydra) need the
real ones.
"""
import inspect
import json
import os
import subprocess
import sys
import textwrap

from torch import nn

import bufferfix

LINEAR = "(in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None"

# The user's classes: executed here (bufferfix active) and in a fresh interpreter before and after
# bufferfix is imported there.
USER_CLASSES = '''
from torch import nn


class MyLinear(nn.Linear):
    def __init__(self, a, b=3):
        super().__init__(a, b)


class PlainLinear(nn.Linear):  # the leaf class's own __init__
    pass


class FromMyLinear(MyLinear):  # MyLinear's __init__
    pass


class NormWithNew(nn.LayerNorm):  # a __new__ of its own: inspect takes it
    def __new__(cls, *args, scale=1.0, **kwargs):
        return super().__new__(cls)

    def __init__(self, width, scale=1.0):
        super().__init__(width)


class Net(nn.Module):
    def __init__(self, width, depth=2):
        super().__init__()


class FromNet(Net):  # Net's __init__
    pass


class Bare(nn.Module):
    pass


class CallingMeta(type(nn.Module)):
    def __call__(cls, x, y):
        return super().__call__()


class WithMetaclassCall(nn.Module, metaclass=CallingMeta):
    pass


USER = [MyLinear, PlainLinear, FromMyLinear, NormWithNew, Net, FromNet, Bare, WithMetaclassCall]
'''

# What inspect.signature gives, by name, for torch.nn's module classes, the user's classes and
# some instances (an error as "ValueError: ...").
SIGNATURES = '''
import inspect
import re

import torch
from torch import nn


def signature(target):
    try:
        return re.sub(" at 0x[0-9a-f]+>", ">", str(inspect.signature(target)))  # defaults' addresses
    except Exception as error:
        return "%s: %s" % (type(error).__name__, error)


def torch_nn_classes():
    found, pending = set(), [nn.Module]
    while pending:
        for subclass in pending.pop().__subclasses__():
            if subclass not in found:
                found.add(subclass)
                pending.append(subclass)
    return [cls for cls in found if cls.__module__.startswith("torch.nn.")]


def signatures(user_classes):
    found = {"%s.%s" % (cls.__module__, cls.__qualname__): signature(cls) for cls in torch_nn_classes()}
    found.update(("user." + cls.__qualname__, signature(cls)) for cls in user_classes)
    found["nn.Module"] = signature(nn.Module)
    found["instance of Linear"] = signature(nn.Linear(2, 3))
    found["instance of MyLinear"] = signature(user_classes[0](2))
    return found
'''


def user_classes():
    namespace = {}
    exec(USER_CLASSES, namespace)
    return namespace["USER"]


def signatures_of(classes):
    namespace = {}
    exec(SIGNATURES, namespace)
    return namespace["signatures"](classes)


def test_torch_nn_classes_have_their_constructor_signatures():
    assert bufferfix.is_enabled()
    assert nn.Linear.__dict__["__new__"] is object.__new__  # the C constructor slot is kept
    assert str(inspect.signature(nn.Linear)) == LINEAR
    assert str(inspect.signature(nn.Embedding)).startswith("(num_embeddings: int, embedding_dim: int, padding_idx")
    assert str(inspect.signature(nn.SiLU)) == "(inplace: bool = False) -> None"
    assert str(inspect.signature(nn.Sequential)) == "(*args)"
    assert str(inspect.signature(nn.Module)) == "(*args: Any, **kwargs: Any) -> None"


def test_user_classes_have_their_constructor_signatures():
    classes = {cls.__name__: cls for cls in user_classes()}
    expected = {
        "MyLinear": "(a, b=3)",
        "PlainLinear": LINEAR,
        "FromMyLinear": "(a, b=3)",
        "NormWithNew": "(*args, scale=1.0, **kwargs)",
        "Net": "(width, depth=2)",
        "FromNet": "(width, depth=2)",
        "Bare": "(*args: Any, **kwargs: Any) -> None",  # nn.Module's
        "WithMetaclassCall": "(x, y)",
    }
    assert {name: str(inspect.signature(cls)) for name, cls in classes.items()} == expected
    assert isinstance(classes["MyLinear"](4), nn.Linear)


def test_instances_have_their_call_signature():
    module = user_classes()[0](2)
    assert str(inspect.signature(module)) == "(*args, **kwargs)"  # nn.Module.__call__'s
    assert module.__signature__ is None and nn.Linear(2, 3).__signature__ is None  # inspect: none of its own


def test_signatures_are_those_without_bufferfix():
    """Every torch.nn module class, the user's classes made before and after bufferfix is
    imported, and instances, against the same interpreter before bufferfix is imported."""
    script = "\n".join([
        SIGNATURES,
        "import json",
        "exec(%r)" % USER_CLASSES,
        "made_before = USER",
        "before = signatures(made_before)",
        "import bufferfix",
        "assert bufferfix.is_enabled()",
        "after = signatures(made_before)",
        "exec(%r)" % USER_CLASSES,
        "made_after = signatures(USER)",
        "print(json.dumps([before, after, made_after]))",
    ])
    environment = {key: value for key, value in os.environ.items() if not key.startswith("BUFFERFIX_")}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    before, after, made_after = json.loads(result.stdout)
    assert len([name for name in before if name.startswith("torch.nn.")]) > 100
    assert not [name for name, found in before.items() if "Error" in found]
    assert after == before
    assert made_after == before
    here = signatures_of(user_classes())  # this process: bufferfix active since conftest imported it
    shared = before.keys() & here.keys()
    assert len(shared) > 100
    assert {name: here[name] for name in shared} == {name: before[name] for name in shared}
