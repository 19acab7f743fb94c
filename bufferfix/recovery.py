"""The one value the mechanism produces about a buffer: how its value was (or was not) recovered.

Warnings, :func:`bufferfix.explain` and the doctor all consume :class:`Recovery` values;
only :mod:`bufferfix.reporting` turns them into words.  Nothing downstream parses text.
Standard library only.
"""
import dataclasses
import enum


class Source(enum.Enum):
    """Where a recovered value came from."""

    KEPT = "kept"  # real all along (accelerate's init_empty_weights keeps buffers real)
    SNAPSHOT = "snapshot"  # taken before the model was moved to meta
    RECOMPUTE_FUNCTION = "recompute function"  # bufferfix.register_recompute
    REPLAY = "replay"  # the constructor of the module (or of an ancestor) re-run on CPU
    LIBRARY = "library"  # left to the library's own initialisation (transformers' _init_weights)
    DERIVED = "derived"  # recomputed from the parameters once they hold values (legacy weight_norm)


class Reason(enum.Enum):
    """Why a value could not be recovered."""

    NO_RECIPE = "no recorded constructor"  # born on meta, nothing recorded for it or its parents
    REFUSED = "constructor cannot be re-run"  # e.g. it takes a module or a meta tensor argument
    NEVER_REPLAY = "never_replay"  # the author forbade re-running the constructor
    REPLAY_RAISED = "replay raised"
    NOT_CREATED = "replay did not create it"
    ON_META = "replay puts it on meta"
    RANDOM = "random"  # drawn from the random number generator: a normal build's value is unknowable
    MODIFIED_IN_PLACE = "modified after construction"
    REPLACED = "replaced after construction"  # set on meta by code outside any constructor: no replay has it
    SHAPE_MISMATCH = "shape mismatch"
    # derived from parameters (legacy weight_norm / spectral_norm), which were cast to another dtype after:
    # a normal build keeps the value from before the cast, which no checkpoint holds
    CAST_AFTER_DERIVED = "parameters cast after it was derived"
    RECOMPUTE_RAISED = "recompute function raised"
    FROM_PRETRAINED_WEIGHT = "computed from a pretrained weight"  # an integration's verdict: no replay has it
    INTERRUPTED = "materialisation interrupted"  # the materialising call raised and the fill did not finish
    INTERNAL_ERROR = "internal error"


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One way of recovering a value that did not work."""

    origin: str | None  # "module.Class" whose recipe / recompute function was tried, None if there was none
    reason: Reason
    detail: str = ""  # words for humans only: never parse it


@dataclasses.dataclass(frozen=True)
class Recovery:
    """How one non-persistent buffer (or plain tensor attribute) got, or did not get, its value."""

    name: str  # qualified path in the model, e.g. "model.layers.0.self_attn.rotary_emb.inv_freq"
    owner: str  # class qualname of the module holding it
    kind: str  # "buffer" or "attribute"
    source: Source | None  # None: not recovered
    origin: str | None = None  # "module.Class" whose recipe / recompute function gave (or failed to give) it
    reason: Reason | None = None  # set when source is None
    detail: str = ""  # words for humans only (an exception message, shapes): never parse it
    attempts: tuple[Attempt, ...] = ()  # when not recovered: every way tried, the nearest module first

    @property
    def recovered(self) -> bool:
        return self.source is not None
