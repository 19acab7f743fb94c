"""The contract every integration follows, and the guards they share.

In the spirit of OpenTelemetry's ``BaseInstrumentor``: one :class:`Integration` subclass per
library, with a ``name`` (what ``BUFFERFIX_DISABLED_INTEGRATIONS`` lists), the ``target`` module
whose import triggers it, and what it does to the library as data, in ``declarations``:

* :class:`Wrap`: wrap a function or method with a wrapt function wrapper;
* :class:`Recompute`: register a recompute function for a class (``bufferfix.register_recompute``);
* :class:`Unrecoverable`: declare that some tensors of a class cannot be recovered, and why;
* :class:`Overwriting`: functions of the library that overwrite a tensor whole (its own
  initialisation's ``constant_`` & co.);
* :class:`ExpectBuffers`: classes whose constructor registers, off meta only, buffers the meta
  build lacks.

:meth:`Integration.instrument` applies them (an entry point this version of the library lacks is
logged and skipped), then runs ``_instrument(module)`` for whatever is not data (the torch
integration's constructor hook); :meth:`Integration.uninstrument` undoes all of it.  Both are
idempotent.  A wrapper left in place because something else wrapped on top of it passes straight
through while ``active`` is false.

Two guards keep a user's call the user's own:

* :func:`contained` runs bufferfix's bookkeeping; an internal failure is logged and warned
  about, never raised into the user's call;
* :class:`Restoring` is the sandwich around a materialising call: plan before, restore
  after, and when the call raises, restore what it had materialised and let the user's
  exception go on unchanged (same object, same traceback).
"""
from __future__ import annotations

import atexit
import dataclasses
import importlib
import logging
from collections.abc import Callable, Sequence
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import wrapt

from .. import errors, reporting
from ..recovery import Reason

if TYPE_CHECKING:
    import torch

    from ..mechanism.deferral import DeferredRestore
    from ..mechanism.recompute import RecomputeFunction
    from ..mechanism.restore import Materialisation
    from ..recovery import Recovery

# Integration modules are imported before their targets (the registry reads their declarations):
# torch and the mechanism are imported where they are used, once the target (and torch) is.

logger = logging.getLogger("bufferfix")

# A wrapt function wrapper is called as wrapper(wrapped, instance, args, kwargs): the original callable, the
# object it was looked up on (None for a plain function) and the call's arguments; it returns the call's
# result.  Those are whatever the wrapped function of torch or of a library takes and gives: Any, here only.
Wrapped = Callable[..., Any]
WrapperArgs = tuple[Any, ...]
WrapperKwargs = dict[str, Any]
Wrapper = Callable[[Wrapped, Any, WrapperArgs, WrapperKwargs], Any]
_Result = TypeVar("_Result")


@dataclasses.dataclass(frozen=True)
class Wrap:
    """Wrap ``where``'s ``dotted`` (``"Class.method"`` or ``"function"``) with ``wrapper``.
    ``also_in``: modules that re-export the function: each binding there that still holds the
    original is wrapped too."""

    where: str
    dotted: str
    wrapper: Wrapper
    also_in: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Recompute:
    """``bufferfix.register_recompute(where.dotted, function)``, unless the user registered one."""

    where: str
    dotted: str
    function: RecomputeFunction


@dataclasses.dataclass(frozen=True)
class Unrecoverable:
    """The tensors under ``attributes`` of ``where.dotted`` modules cannot be recovered, for ``reason``."""

    where: str
    dotted: str
    attributes: tuple[str, ...]
    reason: Reason


@dataclasses.dataclass(frozen=True)
class Overwriting:
    """``where``'s functions ``names`` overwrite their first argument whole without reading it: a
    buffer a library's own initialisation writes with them is left to it (see ``deferral``)."""

    where: str
    names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ExpectBuffers:
    """Modules whose class ``predicate`` accepts may lack, on meta, buffers their constructor
    registers elsewhere (see ``recompute.expect_buffers``)."""

    predicate: Callable[[type], bool]


Declaration = Wrap | Recompute | Unrecoverable | Overwriting | ExpectBuffers


class Integration:
    name = ""  # as listed in BUFFERFIX_DISABLED_INTEGRATIONS
    target = ""  # the module whose import triggers instrument()
    patches = ""  # what it patches, for logs (default: the target)
    declarations: tuple[Declaration, ...] = ()

    def __init__(self) -> None:
        self.active = False
        self._wraps: list[tuple[object, str, Any]] = []  # (owner, attribute, wrapt handle: wrapt has no types)
        self._undo: list[Callable[[], object]] = []  # callables undoing what a declaration did besides wrapping

    def instrument(self, module: ModuleType) -> None:
        """Patch ``module`` (the imported target).  Idempotent; a partial failure is undone."""
        if self.active:
            return
        self.active = True
        try:
            for declaration in self.declarations:
                self._apply(declaration)
            self._instrument(module)
        except BaseException:
            self.uninstrument()
            raise
        logger.debug("bufferfix: %s instrumented", self.patches or self.target)

    def uninstrument(self) -> None:
        if not self.active:
            return
        self.active = False
        try:
            self._uninstrument()
        finally:
            while self._undo:
                self._undo.pop()()
            self._unwrap_all()
        logger.debug("bufferfix: %s uninstrumented", self.patches or self.target)

    def _instrument(self, module: ModuleType) -> None:
        """What is not declared as data (nothing, for most integrations)."""

    def _uninstrument(self) -> None:
        """Undo what ``_instrument`` did besides :meth:`wrap` (those are undone for it)."""

    # ------------------------------------------------------------------ declarations
    def _apply(self, declaration: Declaration) -> None:
        from ..mechanism import deferral, recompute

        if isinstance(declaration, ExpectBuffers):
            recompute.expect_buffers(declaration.predicate)
            self._undo.append(lambda: recompute.forget_expectation(declaration.predicate))
            return
        owner = self._module(declaration.where)
        if isinstance(declaration, Overwriting):
            if owner is not None:
                functions = {getattr(owner, name) for name in declaration.names if self.require(owner, name)}
                functions -= deferral.overwriting  # only what this declaration adds is taken back
                deferral.overwriting.update(functions)
                self._undo.append(lambda: deferral.overwriting.difference_update(functions))
            return
        if owner is None or not self.require(owner, declaration.dotted):
            return
        if isinstance(declaration, Wrap):
            self._apply_wrap(owner, declaration)
            return
        cls = _resolve(owner, declaration.dotted)
        if isinstance(declaration, Recompute):
            if recompute.registered_recompute(cls) is None:  # the user's own comes first
                recompute.register_recompute(cls, declaration.function)

                def unregister() -> None:
                    if recompute.registered_recompute(cls) is declaration.function:
                        recompute.unregister_recompute(cls)

                self._undo.append(unregister)
        else:
            recompute.declare_unrecoverable(cls, declaration.attributes, declaration.reason)
            self._undo.append(lambda: recompute.undeclare_unrecoverable(cls))

    def _apply_wrap(self, owner: ModuleType, declaration: Wrap) -> None:
        holder_path, _, attribute = declaration.dotted.rpartition(".")
        holder = _resolve(owner, holder_path) if holder_path else owner
        original = getattr(holder, attribute)
        self.wrap(holder, attribute, declaration.wrapper)
        for name in declaration.also_in:  # `from library import function` bound it there too
            other = self._module(name)
            if other is not None and getattr(other, attribute, None) is original:
                self.wrap(other, attribute, declaration.wrapper)

    def _module(self, name: str) -> ModuleType | None:
        try:
            return importlib.import_module(name)  # a module of the library, whose target is imported
        except ImportError:
            logger.info("bufferfix: %s has no module %s; not patched", self.name, name)
            return None

    # ------------------------------------------------------------------ helpers
    def wrap(self, owner: object, attribute: str, wrapper: Wrapper) -> None:
        """``wrapt.wrap_function_wrapper(owner, attribute, wrapper)``, recorded for :meth:`uninstrument`."""
        self._wraps.append((owner, attribute, wrapt.wrap_function_wrapper(owner, attribute, wrapper)))

    def _unwrap_all(self) -> None:
        while self._wraps:
            owner, attribute, handle = self._wraps.pop()
            try:
                wrapt.unwrap_object(owner, attribute, handle, missing_ok=True)
            except Exception as error:  # noqa: BLE001 - e.g. a non-wrapt wrapper installed on top of ours
                logger.warning("bufferfix: left an inert wrapper on %s.%s (%s)",
                               getattr(owner, "__name__", owner), attribute, error)

    def require(self, owner: object, dotted: str) -> bool:
        """Does ``owner`` have the attribute path ``dotted`` (``"Class.method"``)?  Logs and says
        False when it does not: that entry point is then not patched."""
        value = owner
        for part in dotted.split("."):
            value = getattr(value, part, None)
            if value is None:
                logger.info("bufferfix: %s has no %s.%s (version %s); not patched", self.name,
                            getattr(owner, "__name__", owner), dotted, _version_of(owner))
                return False
        return True


def _resolve(owner: Any, dotted: str) -> Any:
    """``owner.<dotted>``: a library's class or function, whatever it is (Any)."""
    for part in dotted.split("."):
        owner = getattr(owner, part)
    return owner


def _version_of(module: object) -> object:
    import sys

    top = sys.modules.get(getattr(module, "__name__", "").split(".")[0])
    return getattr(top, "__version__", "?")


def contained(action: Callable[[], _Result], what: str, user_error: bool = False) -> _Result | None:
    """Run bufferfix's own bookkeeping; an internal failure must never break the user's call.

    ``user_error``: the user's call is raising already; then strict mode's
    :class:`~bufferfix.errors.UnrecoverableBufferError` is given as a warning instead, so the
    exception the user sees stays the one their call raised."""
    try:
        return action()
    except errors.UnrecoverableBufferError as strict:
        if not user_error:
            raise
        errors.warn(errors.UnrecoverableBufferWarning(str(strict), strict.recoveries))
        return None
    except Exception:
        logger.exception("bufferfix: internal error while %s", what)
        reporting.internal_error(what)
        return None


class Restoring:
    """``with Restoring(model, ...): <the call that swaps model's tensors for empty ones>``.

    Plans before the call and restores after it.  When the call raises, what it had already
    materialised is filled before the exception goes on (``__exit__`` returns False: the
    exception is the user's, unchanged).  With ``defer_replays``, values only a replay can
    give are held back and left in ``deferred`` (see :mod:`bufferfix.mechanism.deferral`).
    """

    def __init__(self, model: torch.nn.Module, recurse: bool = True, device: torch.device | None = None,
                 defer_replays: bool = False) -> None:
        self.model, self.recurse, self.device, self.defer_replays = model, recurse, device, defer_replays
        self.plan: Materialisation | None = None
        self.deferred: DeferredRestore | None = None

    def __enter__(self) -> Restoring:
        from ..mechanism.restore import Materialisation

        self.plan = contained(lambda: Materialisation(self.model, self.recurse), "planning buffer restoration")
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> Literal[False]:
        plan = self.plan
        if plan is None:
            return False
        if kind is None:
            self.deferred = contained(self._restore, "restoring non-persistent buffers")
        else:
            contained(lambda: report(plan, plan.restore_after_error(self.device)),
                      "restoring non-persistent buffers after %s" % kind.__name__, user_error=True)
        return False

    def _restore(self) -> DeferredRestore | None:
        assert self.plan is not None  # __exit__ restores only what it planned
        deferred, _ = self.plan.restore(self.device, defer_replays=self.defer_replays)
        report(self.plan, ())
        await_loading_end()
        return deferred


class _Restored(Protocol):
    recovered: list[Recovery]  # a plan's Recovery of each value filled (kept while debug logging is on)


def report(plan: _Restored, failures: Sequence[Recovery]) -> None:
    """What a restore did, for the user: each value filled at debug level, the lost ones loudly."""
    for recovery in plan.recovered:
        logger.debug("bufferfix: %s", reporting.describe(recovery))
    plan.recovered.clear()
    if failures:
        reporting.report_unrecoverable(failures)


# --------------------------------------------------------------------------- when loading ends

_forward_hook: torch.utils.hooks.RemovableHandle | None = None
_exit_hook_registered = False


def await_loading_end() -> None:
    """Values a materialisation could not recover wait for their verdict until loading ends: the
    end of a ``load_state_dict`` or of a library's own loading (transformers' ``from_pretrained``),
    or the first forward of any module (a forward pre-hook that takes itself off: nothing stays on
    the forward path), whichever comes first, and at the latest when the process exits.  Code that
    rewrites such a tensor before then (the model's own ``reset_parameters()`` or torchtune's
    ``rope_init()`` after ``to_empty``) leaves nothing to report."""
    global _forward_hook, _exit_hook_registered
    import torch

    from ..mechanism import restore

    if not restore.unsettled():
        return
    if _forward_hook is None:
        _forward_hook = torch.nn.modules.module.register_module_forward_pre_hook(_first_forward)
    if not _exit_hook_registered:
        atexit.register(lambda: contained(loading_ended, "giving the verdicts left at exit"))
        _exit_hook_registered = True


def _first_forward(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
    from ..mechanism import recipes

    if recipes.replays_running and recipes.replaying():
        return  # a replayed constructor calling a module (``register_parametrization`` does): not the model's
    loading_ended()


def loading_ended() -> None:
    """Give the verdicts held since materialisation: named loudly, unless rewritten since."""
    global _forward_hook
    from ..mechanism import restore

    if _forward_hook is not None:
        _forward_hook.remove()
        _forward_hook = None
    if restore.unsettled():
        reporting.report_unrecoverable(restore.settle())
