"""Triton backend: fused kernels for both loss families (``backend="triton"``).

* Row family (LMF, LDAM, focal) — :mod:`.row`: a loss pass (plus the label-only normalisers of
  ``"mean"``), and a gradient pass that recomputes each row and writes the final gradient.
* Region family (Unified Focal, focal Tversky, Mixed Focal, Tversky, Dice) — :mod:`.region`: a
  statistics pass, an ``O(B C)`` finalize, a gradient pass.

Both are ``torch.library`` custom ops (:mod:`.ops`), so ``opcheck`` and
``torch.compile(fullgraph=True)`` work. Serves float16 / bfloat16 / float32 CUDA tensors, and CPU
tensors when Triton runs in interpreter mode (``TRITON_INTERPRET=1`` set before triton is first
imported: that is how the tests run without a GPU). All arithmetic is float32; float64 logits go
to the reference or the cpu backend.

Check mode: ``lmfloss_kernels.set_options(check_backend=True)`` or ``LMFLOSS_KERNELS_CHECK=1``
also runs the eager reference on every call and raises ``BackendMismatchError`` with both values
when they disagree beyond tolerance.
"""

from __future__ import annotations

import torch

from .. import _distributed
from .._autograd import bind_op
from .._backends import region_op_scalars
from . import ops
from ._common import unavailable_reason

__all__ = ["BACKEND", "TritonBackend"]


class TritonBackend:
    """The backend object of the registry contract (see :mod:`lmfloss_kernels._backends`)."""

    name = "triton"
    nonfinite_in_kernel = True

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        return unavailable_reason(device, dtype)

    def row_loss(
        self, logits, labels, margins, ldam_weight, focal_weight, *, alpha, beta, gamma, s, ignore_index, reduction
    ) -> torch.Tensor:
        return self.prepared_row_loss(
            margins, ldam_weight, focal_weight, alpha=alpha, beta=beta, gamma=gamma, s=s, ignore_index=ignore_index,
            reduction=reduction,
        )(logits, labels)  # fmt: skip

    def prepared_row_loss(self, margins, ldam_weight, focal_weight, *, alpha, beta, gamma, s, ignore_index, reduction):
        """``lambda logits, labels: self.row_loss(logits, labels, <these arguments>)``, its constants and options
        converted once."""
        tail = (
            _vector(margins), _vector(ldam_weight), _vector(focal_weight), float(alpha), float(beta), float(gamma),
            float(s), int(ignore_index), reduction,
        )  # fmt: skip
        bound = bind_op(ops.row_loss_op, tail)
        return lambda logits, labels: bound(logits, labels)[0]

    def region_loss(self, logits, target, focal_weight, focal_gamma, tversky_exponent, *, sync=None, **options):
        """The region family; ``sigmoid``: the multi-label mode, focal weight and gamma ``(2, C)``."""
        if sync is None:
            return self.prepared_region_loss(focal_weight, focal_gamma, tversky_exponent, **options)(logits, target)
        vectors = (_vector(focal_weight), _vector(focal_gamma), _vector(tversky_exponent))
        *scalars, _, sigmoid = region_op_scalars(**options)  # the distributed kernels run with reduction="none"
        kernels = _distributed.RegionKernels(
            statistics=lambda z: ops.region_forward_op(z, target, *vectors, *scalars, "none", sigmoid),
            gradient=lambda w, stats: ops.region_backward_op(
                w, logits, target, stats, *vectors, *scalars, "none", sigmoid
            ),
            layout=(0, 1, 2),
            backend=self.name,
        )
        names = ("delta", "focal_coef", "tversky_coef", "smooth_nr", "smooth_dr", "batch", "reduction")
        synced = _distributed.synced_options(tversky_exponent, **{name: options[name] for name in names})
        return _distributed.SyncedRegion.apply(logits, kernels, synced, sync)

    def prepared_region_loss(self, focal_weight, focal_gamma, tversky_exponent, *, sync=None, **options):
        """``lambda logits, target: self.region_loss(logits, target, <these arguments>)``, its constants and
        options converted once; ``None`` with ``sync`` (the distributed path, not replayed)."""
        if sync is not None:
            return None
        vectors = (_vector(focal_weight), _vector(focal_gamma), _vector(tversky_exponent))
        bound = bind_op(ops.region_forward_op, (*vectors, *region_op_scalars(**options)))
        return lambda logits, target: bound(logits, target)[0]


def _vector(values: torch.Tensor) -> torch.Tensor:
    """Per-class constants as the kernels read them: contiguous float32, detached (a sigmoid mode's
    ``(2, C)`` focal constants flattened: positive row, then negative)."""
    return values.detach().to(torch.float32).reshape(-1).contiguous()


BACKEND = TritonBackend()
