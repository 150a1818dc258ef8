"""Process-wide switches that trade speed for safety.

Both default to the fast behaviour and can be turned on without touching code, through
environment variables read at import, or at run time with :func:`set_options` /
:func:`options` (a context manager).

``check_labels``
    Verify that every label lies in ``[0, C)`` (or equals ``ignore_index``) and that every entry
    of a one-hot / soft target is finite and in ``[0, 1]``. On CPU tensors the check costs
    nothing worth mentioning and always runs. On accelerator tensors it needs a device-to-host
    synchronisation, so it runs only when this switch is on (``LMFLOSS_KERNELS_CHECK_LABELS=1``).
    Without it an out-of-range label on the GPU gives an undefined (but memory-safe: kernels
    mask it) loss, and a soft entry outside ``[0, 1]`` a meaningless one. Code traced by
    ``torch.compile`` skips the value checks on every device (they would break the graph).

``check_backend``
    Debug mode: every call on a fused backend is also computed by the eager reference on a
    detached copy, and the loss values and logit gradients are compared; a mismatch beyond
    tolerance raises :class:`BackendMismatchError` with both values
    (``LMFLOSS_KERNELS_CHECK=1``). Roughly triples the cost of a call.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Options:
    check_labels: bool = False
    check_backend: bool = False


_current = Options(
    check_labels=_env_flag("LMFLOSS_KERNELS_CHECK_LABELS"),
    check_backend=_env_flag("LMFLOSS_KERNELS_CHECK"),
)


def get_options() -> Options:
    """The switches in force now."""
    return _current


def set_options(**changes: bool) -> Options:
    """Change switches for the rest of the process; returns the previous :class:`Options`."""
    global _current
    known = {f.name for f in fields(Options)}
    for key, value in changes.items():
        if key not in known:
            raise ValueError(f"unknown option {key!r}; expected one of {sorted(known)}")
        if not isinstance(value, bool):
            raise TypeError(f"option {key!r} must be a bool, got {type(value).__name__}")
    previous = _current
    _current = replace(_current, **changes)
    return previous


@contextlib.contextmanager
def options(**changes: bool) -> Iterator[Options]:
    """Context manager form of :func:`set_options`: ``with options(check_backend=True): ...``."""
    previous = set_options(**changes)
    try:
        yield _current
    finally:
        set_options(**{f.name: getattr(previous, f.name) for f in fields(Options)})
