"""Backend registry: which implementation computes a loss family for a given tensor.

A backend is an object with a ``name``, an ``unavailable_reason(device, dtype)`` method that
returns ``None`` when it can serve tensors of that device and dtype (or a sentence saying why
not), and the two loss-family functions with the signatures of
:func:`lmfloss_kernels.reference.row_loss` and :func:`lmfloss_kernels.reference.region_loss`;
``nonfinite_in_kernel = True`` if its kernels apply the non-finite logits policy themselves
(without it, the package adds the policy on the host). Fused backends live in their own
subpackages and are imported lazily, the first time they are asked for (the C++ extension when
the package is imported, so that a missing or stale build is reported once, at import), so a
broken or missing Triton or C++ extension never stops the others.

``"auto"`` tries, by device type, the candidates of :data:`AUTO_ORDER` and takes the first
that is available; when it has to fall back to the eager reference on a device that has fused
backends it warns once, saying why.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import Protocol

import torch

from . import reference
from ._autograd import refuse_double_backward as refuse_double_backward  # re-exported for the backends


class Backend(Protocol):
    name: str
    # Whether the kernels apply the non-finite logits policy themselves, from the logits they load
    # anyway (a probe added to each row's / image's loss). Otherwise functional._propagate_nonfinite
    # adds it: for a fused kernel a second full read of the logits (two for reduction="none"), some
    # 30% more memory traffic for a kernel bound by it, and on CPU a host read of their range per call.
    nonfinite_in_kernel: bool

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None: ...

    def row_loss(self, *args, **kwargs) -> torch.Tensor: ...

    def region_loss(self, *args, **kwargs) -> torch.Tensor: ...


class ReferenceBackend:
    """The eager PyTorch definitions of :mod:`lmfloss_kernels.reference`; serves every tensor."""

    name = "reference"
    nonfinite_in_kernel = False

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        return None

    row_loss = staticmethod(reference.row_loss)
    region_loss = staticmethod(reference.region_loss)


# name -> "module:attribute" of the backend object, imported on first use.
_LOCATIONS = {
    "triton": "lmfloss_kernels.triton:BACKEND",
    "cuda": "lmfloss_kernels.ext:CUDA_BACKEND",
    "cpu": "lmfloss_kernels.ext:CPU_BACKEND",
}
AUTO_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}
BACKEND_NAMES = ("auto", "reference", *_LOCATIONS)

_loaded: dict[str, Backend | str] = {"reference": ReferenceBackend()}
_warned: set[str] = set()
# Reasons a user has already been warned about (the extension's load failure, at import): the
# fallback of "auto" does not repeat them.
_announced: set[str] = set()


def announce(reason: str) -> None:
    """Record that a warning has already told the user ``reason``."""
    _announced.add(reason)


def _load(name: str) -> Backend | str:
    """The backend object, or a string saying why it could not be imported."""
    if name not in _loaded:
        module_name, attribute = _LOCATIONS[name].split(":")
        try:
            _loaded[name] = getattr(importlib.import_module(module_name), attribute)
        except Exception as error:  # a broken backend of any kind must not stop the others
            _loaded[name] = f"it could not be imported ({type(error).__name__}: {error})"
    return _loaded[name]


def loaded(name: str) -> Backend | str | None:
    """The registry's object for ``name`` as imported so far (``None`` if never asked for)."""
    return _loaded.get(name)


def preload(name: str) -> None:
    """Import the backend ``name`` (every fused candidate for ``"auto"``) now.

    Criteria call this when they are built, so that a criterion first called inside
    ``torch.compile(fullgraph=True)`` finds its backend already imported (dynamo does not
    trace ``importlib``). Import failures are remembered, not raised.
    """
    for candidate in _LOCATIONS if name == "auto" else (name,) if name in _LOCATIONS else ():
        _load(candidate)


def _reason(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    backend = _load(name)
    if isinstance(backend, str):
        return backend
    return backend.unavailable_reason(device, dtype)


def available_backends(device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> list[str]:
    """Names of the backends that can serve tensors of this device and dtype.

    ``device=None``: the backends that can serve some device present here (the CPU, and CUDA when
    a device is visible), in the registry's order.
    """
    if device is None:
        present = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
        return [name for name in BACKEND_NAMES[1:] if any(_reason(name, d, dtype) is None for d in present)]
    device = torch.device(device)
    return [name for name in BACKEND_NAMES[1:] if _reason(name, device, dtype) is None]


def _user_stacklevel() -> int:
    """``stacklevel`` that attributes a warning to the first caller outside this package and torch.

    The call depth differs between the functional API and the modules (whose calls pass through
    ``nn.Module.__call__``), so a fixed level would point into library code for one of them.
    Frames of the import machinery are skipped too, so a warning raised while the package is
    imported points at the user's ``import`` line; ``warnings`` itself does not count the
    ``importlib._bootstrap`` frames, so neither does this level.
    """
    libraries = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (sys.modules[__package__], torch))
    importlib_dir = os.path.dirname(os.path.abspath(importlib.__file__)) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None:
        filename = frame.f_code.co_filename
        if "importlib" in filename and "_bootstrap" in filename:
            frame = frame.f_back
            continue
        if not os.path.abspath(filename).startswith((*libraries, importlib_dir)):
            break
        frame, level = frame.f_back, level + 1
    return level


def resolve_backend(name: object, logits: torch.Tensor) -> Backend:
    """The backend object for ``name`` (or the best one for ``"auto"``) and these logits."""
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {list(BACKEND_NAMES)}, got {name!r}")
    device, dtype = logits.device, logits.dtype
    if name == "auto":
        reasons = {}
        for candidate in AUTO_ORDER.get(device.type, ()):
            reason = _reason(candidate, device, dtype)
            if reason is None:
                return _load(candidate)  # type: ignore[return-value]
            reasons[candidate] = reason
        key = f"{device.type}/{dtype}"
        if reasons and key not in _warned and not set(reasons.values()) <= _announced:
            _warned.add(key)
            why = "; ".join(f"{n}: {r}" for n, r in reasons.items())
            warnings.warn(
                f"lmfloss_kernels: no fused backend for {device.type} {dtype} tensors ({why}); "
                f"using the eager reference, which is correct but slower and uses more memory",
                RuntimeWarning,
                stacklevel=_user_stacklevel(),
            )
        return _loaded["reference"]  # type: ignore[return-value]
    reason = _reason(name, device, dtype)
    if reason is not None:
        raise ValueError(
            f"backend {name!r} cannot serve {device.type} {dtype} tensors: {reason}. "
            f"Available for these tensors: {['auto', *available_backends(device, dtype)]}"
        )
    return _load(name)  # type: ignore[return-value]


def region_op_scalars(
    *, delta, focal_coef, tversky_coef, smooth_nr, smooth_dr, eps, clip, batch, ignore_index, reduction, sigmoid=False
) -> tuple:
    """The fused region ops' arguments after their three per-class tensors, in schema order, from the
    keywords of a backend's ``region_loss`` (its ``sync`` aside)."""
    return (
        float(delta), float(focal_coef), float(tversky_coef), float(smooth_nr), float(smooth_dr), float(eps),
        bool(clip), bool(batch), None if ignore_index is None else int(ignore_index), reduction, bool(sigmoid),
    )  # fmt: skip
