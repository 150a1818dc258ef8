"""C++/CUDA extension backends: ``"cpu"`` (CPU tensors) and ``"cuda"`` (CUDA tensors).

Both run the kernels of ``csrc/`` (one header of shared loss math, CPU kernels parallel over
fixed voxel chunks, CUDA kernels with block reductions and a deterministic second stage)
through the custom ops of :mod:`lmfloss_kernels.ext.ops`, and compute exactly the functions of
:func:`lmfloss_kernels.reference.row_loss` and :func:`lmfloss_kernels.reference.region_loss`
(softmax and sigmoid modes): loss in float32 (float64 for float64 logits), gradient in the logits' dtype, bitwise
deterministic. Importing this module loads the compiled library; if it is missing or was built
against another torch, one warning says how to rebuild and both backends report themselves
unavailable.
"""

from __future__ import annotations

import importlib

import torch

from .. import _distributed
from .._autograd import bind_op
from .._backends import region_op_scalars
from . import _loader, ops

BUILD_INFO, LOAD_ERROR = _loader.load()
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

__all__ = ["BUILD_INFO", "CPU_BACKEND", "CUDA_BACKEND", "ExtensionBackend"]


# Which devices the loaded library has kernels for, read once (a dispatcher query in
# unavailable_reason would break torch.compile tracing of the functional API).
KERNEL_DEVICES = frozenset(
    device
    for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key("lmfloss_ext::region_loss_forward", key)
)


# Whether the loaded library's CPU kernels apply the non-finite logits policy themselves (a probe in
# the forward kernels, as the CUDA ones have; csrc/ops.cpp says so). A library built before they did
# leaves it to functional._propagate_nonfinite.
_LIBRARY = importlib.import_module("lmfloss_kernels._C") if LOAD_ERROR is None else None
CPU_NONFINITE_IN_KERNEL = getattr(_LIBRARY, "NONFINITE_IN_CPU_KERNELS", 0) == 1
# Whether the loaded library has the call plans' native prepared calls (csrc/prepared.cpp); one built
# before them leaves the plans to their Python replay.
NATIVE_PREPARED_CALLS = hasattr(_LIBRARY, "PreparedRowLoss")


def _with_native(call, constants: tuple, make):
    """``call``, given ``call.native(replay)``: ``make(target_replay)``, the native form of a call plan's
    replay (``_plans._Plan``; ``replay`` a ``_plans.TargetReplay``), where the library has one and the
    per-class ``constants`` are plain tensors that need no gradient (as :func:`.._autograd.bind_op` asks)."""
    if NATIVE_PREPARED_CALLS and all(type(c) is torch.Tensor and not c.requires_grad for c in constants):
        call.native = lambda replay: make(_LIBRARY.TargetReplay(*replay))
    return call


class ExtensionBackend:
    """The extension's kernels for tensors of one device type (``"cpu"`` or ``"cuda"``)."""

    def __init__(self, device_type: str):
        self.name = device_type
        self.device_type = device_type
        # Backend.nonfinite_in_kernel: the CUDA kernels have the probe; the CPU ones if the library is recent.
        self.nonfinite_in_kernel = device_type == "cuda" or CPU_NONFINITE_IN_KERNEL

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if LOAD_ERROR is not None:
            return LOAD_ERROR
        if device.type != self.device_type:
            return f"it serves {self.device_type} tensors only"
        if dtype not in FLOAT_DTYPES:
            return f"it does not support {dtype}"
        if self.device_type not in KERNEL_DEVICES:
            return "the extension was built without CUDA kernels (set FORCE_CUDA=1 or TORCH_CUDA_ARCH_LIST and rebuild)"
        if self.device_type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is available"
        return None

    def row_loss(
        self, logits, labels, margins, ldam_weight, focal_weight, *, alpha, beta, gamma, s, ignore_index, reduction
    ) -> torch.Tensor:
        return self.prepared_row_loss(
            margins, ldam_weight, focal_weight, alpha=alpha, beta=beta, gamma=gamma, s=s, ignore_index=ignore_index,
            reduction=reduction,
        )(logits, labels)  # fmt: skip

    def prepared_row_loss(self, margins, ldam_weight, focal_weight, *, alpha, beta, gamma, s, ignore_index, reduction):
        """``lambda logits, labels: self.row_loss(logits, labels, <these arguments>)``, its options converted once."""
        tail = (
            margins, ldam_weight, focal_weight, float(alpha), float(beta), float(gamma), float(s), int(ignore_index),
            reduction,
        )  # fmt: skip
        bound = bind_op(ops.row_loss_op, tail)

        def call(logits, labels):
            return bound(logits, labels)[0]

        code = ops.REDUCTION_CODES[reduction]
        return _with_native(call, tail[:3], lambda replay: _LIBRARY.PreparedRowLoss(replay, *tail[:-1], code))

    def region_loss(self, logits, target, focal_weight, focal_gamma, tversky_exponent, *, sync=None, **options):
        if sync is None:
            return self.prepared_region_loss(focal_weight, focal_gamma, tversky_exponent, **options)(logits, target)
        vectors = (focal_weight, focal_gamma, tversky_exponent)
        *scalars, _, sigmoid = region_op_scalars(**options)  # the distributed kernels run with reduction="none"
        kernels = _distributed.RegionKernels(
            statistics=lambda z: ops.region_loss_op(z, target, *vectors, *scalars, "none", sigmoid),
            gradient=lambda w, st: ops.region_loss_backward_op(
                w, logits, target, *vectors, st, *scalars, "none", sigmoid
            ),
            layout=(3 * logits.shape[1], 3 * logits.shape[1] + 1, 0),
            backend=self.name,
        )
        names = ("delta", "focal_coef", "tversky_coef", "smooth_nr", "smooth_dr", "batch", "reduction")
        synced = _distributed.synced_options(tversky_exponent, **{name: options[name] for name in names})
        return _distributed.SyncedRegion.apply(logits, kernels, synced, sync)

    def prepared_region_loss(self, focal_weight, focal_gamma, tversky_exponent, *, sync=None, **options):
        """``lambda logits, target: self.region_loss(logits, target, <these arguments>)``, its options converted
        once; ``None`` with ``sync`` (the distributed path, not replayed)."""
        if sync is not None:
            return None
        tail = (focal_weight, focal_gamma, tversky_exponent, *region_op_scalars(**options))
        bound = bind_op(ops.region_loss_op, tail)

        def call(logits, target):
            return bound(logits, target)[0]

        *head, reduction, sigmoid = tail
        code = ops.REDUCTION_CODES[reduction]
        return _with_native(call, tail[:3], lambda replay: _LIBRARY.PreparedRegionLoss(replay, *head, code, sigmoid))


CPU_BACKEND = ExtensionBackend("cpu")
CUDA_BACKEND = ExtensionBackend("cuda")
