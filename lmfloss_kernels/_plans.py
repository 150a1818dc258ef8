"""Call plans of the criteria: the resolved work of a call, replayed while nothing it depends on changes.

A criterion's call spends most of its host time, on small inputs, deciding things that do not
change from one training step to the next: checking the hyper-parameters, building the per-class
constants, serving its buffers on the logits' device, choosing the backend. All of that depends on
the criterion's state (its keywords, backend and buffers), on the process-wide options and on the
logits' and target's type, dtype, device and shape, never on their values. So the first call with
a given signature runs the full path while a :class:`Recording` notes two things:

* the outermost target check (:func:`recorded_target_check`), which also turns the target into what
  the kernels read (channel axis dropped, bool viewed as uint8...);
* the dispatch of :func:`lmfloss_kernels.functional._run`: the backend function, the per-class
  constants and the scalar keywords it was given (:func:`record_dispatch`).

Later calls with the same signature and state run only those two: every value check of the target
(label range, soft-map range, the row losses' all-ignored rule) still runs on every call, with the
same errors, as does the non-finite logits policy; only the work that the signature decides is
skipped. A call is not planned, and runs the full path every time, when its result is not exactly
that one dispatch of the logits and checked target (a loss that post-processes or combines results),
when a keyword is a tensor or an object other than a plain number, string or ``None`` (``dist_sync``'s
process group), under ``torch.compile``, a dispatch mode, a ``torch.func`` transform, tensor
subclasses, inference mode or the ``check_backend`` option.

Where the backend offers it (the C++ extension), the two run as one native call: the replayed check
describes itself as a :class:`TargetReplay` and the prepared dispatch turns that into an object of
the compiled library (``csrc/prepared.cpp``) that checks the target's values and calls the op with
no Python in between. It answers ``None`` whenever it cannot give exactly this plan's call (a bad
value, every label ignored where that is decided upstream, a layout it does not scan, a torch
function or dispatch mode), and the Python replay then runs, with the package's errors and rules.
"""

from __future__ import annotations

import contextvars
import functools
import typing

import torch
from torch._C._functorch import peek_interpreter_stack as _functorch_interpreter
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from . import _backends
from ._config import get_options

# The recording of the call being planned, if any (per thread and per task).
_RECORDING: contextvars.ContextVar[Recording | None] = contextvars.ContextVar("lmfloss_kernels_plan", default=None)
# Plans kept per criterion: a training loop uses one or two signatures (train / validation, a last
# smaller batch); beyond this many the cache starts over rather than growing with every shape.
MAX_PLANS = 8
_PLAIN = (bool, int, float, str, type(None))


class TargetReplay(typing.NamedTuple):
    """What a replayed target check does, for a native replay of it (the check's ``native_replay``).

    The checks of ``_validation`` describe themselves with it; ``csrc/prepared.cpp`` implements it.
    """

    dense: bool  # a dense (B, C, *S) map whose entries must be finite and in [0, 1]; else a label map
    squeeze: bool  # a label map given with a singleton channel axis (B, 1, *S): dropped
    inspect: bool  # the values are read (check_label_range / check_soft_range); else only the layout
    classes: int  # labels must lie in [0, classes) ...
    ignore_index: int | None  # ... or equal this
    every_ignored_to_python: bool  # an all-ignored call takes the full path (the row losses' rule)


class Recording:
    """What one full call did, as :func:`recorded_target_check` and :func:`record_dispatch` saw it."""

    __slots__ = ("target_check", "checked_target", "dispatches", "dispatch")

    def __init__(self) -> None:
        self.target_check = None
        self.checked_target = None
        self.dispatches = 0
        self.dispatch = None


def recorded_target_check(planned=None):
    """Decorator of the target checks: while a call is recorded, note the outermost one and its result.

    ``planned(logits, target, *args, **kwargs)``, called once the check has passed, gives the check
    for the later calls with the same signature: a function of ``(logits, target)`` with the same
    result and the same errors on them, which runs only what the signature leaves undecided (value
    checks, conversions). Without it a plan replays the whole check.
    """

    def decorate(check):
        @functools.wraps(check)
        def recorded(logits, target, *args, **kwargs):
            recording = _RECORDING.get()
            if recording is None or recording.target_check is not None:
                return check(logits, target, *args, **kwargs)
            recording.target_check = (check, args, kwargs, planned)
            result = check(logits, target, *args, **kwargs)
            recording.checked_target = result
            return result

        return recorded

    return decorate


def record_dispatch(compute, logits: torch.Tensor, args: tuple, kwargs: dict, loss) -> None:
    """Note that ``loss = compute(logits, *args, **kwargs)`` was the backend dispatch of the call being recorded."""
    recording = _RECORDING.get()
    if recording is not None:
        recording.dispatches += 1
        recording.dispatch = (compute, logits, args, kwargs, loss)


class _Plan:
    """The replayable part of one recorded call; ``compute is None`` marks a signature that is not planned."""

    __slots__ = (
        "state", "buffers", "implementation", "check", "compute", "constants", "kwargs", "prepared", "native"
    )  # fmt: skip

    def __init__(self, state, buffers, implementation=None, check=None, compute=None, constants=(), kwargs=None):
        self.state = state
        self.buffers = buffers
        self.implementation = implementation
        self.check = check
        self.compute = compute
        self.constants = constants
        self.kwargs = kwargs
        # compute(logits, target, *constants, **kwargs) as a function of (logits, target) whose work on the
        # constants and keywords is done (functional._Dispatch.prepared), where the backend offers one.
        prepare = getattr(compute, "prepared", None)
        self.prepared = None if prepare is None else prepare(constants, kwargs)
        # check and prepared as one native call (see the module's docstring), where both offer it.
        replay = getattr(check, "native_replay", None)
        native = getattr(self.prepared, "native", None)
        self.native = None if replay is None or native is None else native(replay)

    def holds(self, state, criterion) -> bool:
        if self.state != state:
            return False
        current = criterion._buffers
        for name, buffer, version in self.buffers:
            if current.get(name) is not buffer or (buffer is not None and buffer._version != version):
                return False
        # The registry may be replaced (tests) or a backend reloaded: the plan keeps the object it resolved.
        return self.implementation is None or _backends.loaded(self.implementation.name) is self.implementation

    def run(self, logits: torch.Tensor, target: torch.Tensor):
        """The loss, or ``NotImplemented`` when this call needs the full path (every label ignored)."""
        if self.native is not None:
            loss = self.native(logits, target)
            if loss is not None:
                return loss
        checked = self.check(logits, target)
        if isinstance(checked, tuple):  # (labels, every label ignored): the row losses' rule is decided upstream
            checked, every_ignored = checked
            if every_ignored:
                return NotImplemented
        if self.prepared is not None:
            return self.prepared(logits, checked)
        return self.compute(logits, checked, *self.constants, **self.kwargs)


class CallPlans(dict):
    """A criterion's plans by call signature. Copies and pickles of the criterion start with none."""

    def __reduce__(self):
        return (CallPlans, ())


def _plannable_now() -> bool:
    return not (
        torch.compiler.is_compiling()
        or is_in_torch_dispatch_mode()
        or _functorch_interpreter() is not None
        or torch.is_inference_mode_enabled()
    )


def _snapshot(state: tuple) -> tuple:
    return tuple(dict(part) if isinstance(part, dict) else part for part in state)


def _plain(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def planned_call(criterion: torch.nn.Module, state: tuple, compute, logits, target):
    """``compute(logits, target)``, replayed from the criterion's plan for this call signature when one holds.

    ``state``: everything of the criterion besides its buffers that ``compute`` reads (backend name,
    keyword dicts); compared by value, so an edited keyword makes the next call plan again.
    """
    if (
        type(logits) is not torch.Tensor
        or type(target) is not torch.Tensor
        or torch.compiler.is_compiling()
        or _functorch_interpreter() is not None
    ):
        return compute(logits, target)
    key = (logits.dtype, logits.device, logits.shape, target.dtype, target.device, target.shape, get_options())
    plans = criterion.__dict__.get("_call_plans")
    if plans is None:
        plans = criterion.__dict__["_call_plans"] = CallPlans()
    plan = plans.get(key)
    if plan is not None and plan.holds(state, criterion):
        if plan.compute is None:
            return compute(logits, target)
        loss = plan.run(logits, target)
        return compute(logits, target) if loss is NotImplemented else loss
    if not _plannable_now() or get_options().check_backend:
        return compute(logits, target)
    recording = Recording()
    token = _RECORDING.set(recording)
    try:
        loss = compute(logits, target)
    finally:
        _RECORDING.reset(token)
    if recording.dispatches == 0:
        return loss  # decided without a kernel (every label ignored): plan on a later call
    if len(plans) >= MAX_PLANS:
        plans.clear()
    plans[key] = _plan_of(recording, criterion, state, logits, target, loss)
    return loss


def _plan_of(recording: Recording, criterion, state, logits, target, loss) -> _Plan:
    """The plan of a recorded call, or an unplanned marker when replaying it would not give the same call."""
    buffers = tuple(
        (name, buffer, None if buffer is None else buffer._version) for name, buffer in criterion._buffers.items()
    )
    unplanned = _Plan(_snapshot(state), buffers)
    if recording.dispatches > 1 or recording.target_check is None:
        return unplanned
    compute, dispatched_logits, args, kwargs, dispatched_loss = recording.dispatch
    checked = recording.checked_target
    checked = checked[0] if isinstance(checked, tuple) else checked
    constants = args[1:]
    if (
        loss is not dispatched_loss
        or dispatched_logits is not logits
        or not args
        or args[0] is not checked
        or not all(_plain(v) for v in kwargs.values())
        or not _plain(recording.target_check[1])
        or not all(_plain(v) for v in recording.target_check[2].values())
        or any(not isinstance(c, torch.Tensor) or c.requires_grad or c.is_inference() for c in constants)
    ):
        return unplanned
    implementation = compute.implementation
    check, check_args, check_kwargs, planned = recording.target_check
    if planned is not None:
        replay_check = planned(logits, target, *check_args, **check_kwargs)
    else:

        def replay_check(logits, target):
            return check(logits, target, *check_args, **check_kwargs)

    return _Plan(unplanned.state, buffers, implementation, replay_check, compute, constants, dict(kwargs))
