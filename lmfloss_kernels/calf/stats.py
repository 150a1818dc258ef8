r"""Dataset imbalance statistics for CALF: per-image foreground sizes, their skewness and kurtosis.

From the CALF paper (Alam et al., arXiv 2504.04458): the imbalance severity of a segmentation data
set is measured by the distribution of its **foreground sizes** ``A_1 .. A_N`` (voxels of foreground
per image) through the population skewness and excess kurtosis

.. math::

    S = \frac{1}{N}\sum_i \Big(\frac{A_i - \mu}{\sigma}\Big)^3, \qquad
    K = \frac{1}{N}\sum_i \Big(\frac{A_i - \mu}{\sigma}\Big)^4 - 3,

``μ``, ``σ`` the population mean and standard deviation (``scipy.stats.skew(bias=True)`` and
``scipy.stats.kurtosis(fisher=True, bias=True)``). Ours, not the paper's: which classes count as
foreground (default: every class but 0), dropping images without foreground before the statistics
(``drop_empty=True``, our reading of the paper's "dataset filtering"), and the warning below
:data:`MIN_IMAGES` images.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .._config import get_options
from .._validation import check_ignore_index, check_label_range
from .transforms import resolve_fused

__all__ = [
    "MIN_IMAGES",
    "FewImagesWarning",
    "ForegroundSizeAccumulator",
    "ImbalanceStatistics",
    "foreground_sizes",
    "imbalance_statistics",
]

MIN_IMAGES = 8
"""Below this many images the sample skewness and kurtosis are too noisy to choose a loss by."""

COUNT_BACKENDS = ("auto", "reference", "cpu", "triton")


class FewImagesWarning(UserWarning):
    """The statistics were computed from fewer than ``min_count`` images."""


# --------------------------------------------------------------------------------------------
# Per-image class counts


def _check_num_classes(num_classes: object) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}: {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    return num_classes


def _count_reference(labels: torch.Tensor, num_classes: int, ignore_index: int | None) -> torch.Tensor:
    # One bincount over the key b * C + label; labels outside [0, C) or ignored go to an extra bin.
    # Several passes with int64 temporaries (about 17 bytes per uint8 voxel): the definition, not
    # the fast path.
    batch_size = labels.shape[0]
    flat = labels.reshape(batch_size, -1).long()
    keep = (flat >= 0) & (flat < num_classes)
    if ignore_index is not None:
        keep &= flat != ignore_index
    offsets = torch.arange(batch_size, device=flat.device).unsqueeze(1) * num_classes
    key = torch.where(keep, flat + offsets, batch_size * num_classes)
    counts = torch.bincount(key.reshape(-1), minlength=batch_size * num_classes + 1)
    return counts[: batch_size * num_classes].view(batch_size, num_classes)


def foreground_sizes(
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Voxel count of every class in every image: ``(B, num_classes)`` int64 on the labels' device:

    .. math:: n_{bc} = \#\{\, i : \mathrm{labels}_{bi} = c \,\}, \qquad c = 0 \ldots C - 1.

    ``labels``: integer or bool label map ``(B, *spatial)`` (a channel axis ``(B, 1, *S)`` is just
    another spatial axis here). Voxels equal to ``ignore_index`` are not counted. Values must lie in
    ``[0, num_classes)`` or equal ``ignore_index``: checked on CPU tensors, and on GPU tensors when
    ``set_options(check_labels=True)`` (the check synchronises); unchecked stray values are not
    counted.

    Backends (the package's names):

    * ``"cpu"`` (``"auto"`` for CPU tensors when the C++ extension is loaded): one pass over the
      labels in their own dtype (no int64 copy) into per-thread histograms, which also counts the
      labels out of range, so the range check costs no second pass; bitwise deterministic.
    * ``"triton"`` (``"auto"`` for CUDA tensors; CPU under ``TRITON_INTERPRET=1``): a kernel that
      reads each label once and writes per-tile counts, summed per image.
    * ``"reference"``: one ``torch.bincount`` over ``b * num_classes + label`` (the fallback of
      ``"auto"`` where no fused backend can serve).
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be an integer or bool label map, got dtype {labels.dtype}")
    if labels.dim() < 2 or labels.shape[0] == 0:
        raise ValueError(f"labels must have shape (B, *spatial) with B >= 1, got {tuple(labels.shape)}")
    num_classes = _check_num_classes(num_classes)
    ignore_index = check_ignore_index(ignore_index, optional=True)
    if backend not in COUNT_BACKENDS:
        raise ValueError(f"backend must be one of {COUNT_BACKENDS}, got {backend!r}")
    # The kernels read labels only: their availability is asked for float32 logits.
    chosen = resolve_fused(backend, labels.device, torch.float32, "labels")
    check = labels.device.type == "cpu" or get_options().check_labels
    if chosen == "cpu":
        from ..ext.calf_ops import foreground_sizes_op

        counts, strays = foreground_sizes_op(labels, num_classes, ignore_index)
        if check and int(strays):  # error path only: the range of the labels, for the message
            check_label_range(labels, num_classes, ignore_index, name="labels")
        return counts
    if check:
        check_label_range(labels, num_classes, ignore_index, name="labels")
    if chosen == "triton":
        from ._triton import calf_foreground_sizes

        return calf_foreground_sizes(labels, num_classes, ignore_index)
    return _count_reference(labels, num_classes, ignore_index)


# --------------------------------------------------------------------------------------------
# Skewness and kurtosis


@dataclass(frozen=True)
class ImbalanceStatistics:
    """Distribution of per-image foreground sizes: ``count`` images, population moments.

    ``skewness`` and ``kurtosis`` (excess) are NaN when they are undefined: fewer than two images,
    or all sizes equal.
    """

    count: int
    mean: float
    std: float
    skewness: float
    kurtosis: float

    def __str__(self) -> str:
        return (
            f"{self.count} images, foreground size mean {self.mean:.6g}, std {self.std:.6g}, "
            f"skewness S = {self.skewness:.4g}, excess kurtosis K = {self.kurtosis:.4g}"
        )


def _as_float64(sizes: object) -> torch.Tensor:
    """Sizes as a 1-D float64 CPU tensor (from a tensor, a numpy array or a sequence of numbers)."""
    if isinstance(sizes, str | bytes) or not (
        isinstance(sizes, torch.Tensor | Sequence) or hasattr(sizes, "__array__")
    ):
        raise TypeError(f"sizes must be a 1-D tensor, array or sequence of numbers, got {type(sizes).__name__}")
    try:
        values = torch.as_tensor(sizes).detach().to("cpu", torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"sizes must be a sequence of numbers, got {sizes!r}") from None
    if values.dim() != 1:
        raise ValueError(f"sizes must be 1-D (one foreground size per image), got shape {tuple(values.shape)}")
    if values.numel() == 0:
        raise ValueError("sizes must hold at least one foreground size, got none")
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise ValueError(
            f"sizes must be finite and non-negative, got min {float(values.min()):g}, max {float(values.max()):g}"
        )
    return values


def imbalance_statistics(sizes, *, min_count: int = MIN_IMAGES) -> ImbalanceStatistics:
    r"""Population skewness ``S`` and excess kurtosis ``K`` of per-image foreground sizes.

    ``sizes``: a 1-D tensor, array or sequence (e.g. :attr:`ForegroundSizeAccumulator.sizes`).
    Computed in float64 with centred moments ``m_k = mean((A - μ)^k)``: ``S = m3 / m2^{3/2}``,
    ``K = m4 / m2^2 - 3``, identical to ``scipy.stats.skew(bias=True)`` and
    ``scipy.stats.kurtosis(fisher=True, bias=True)``; NaN (as in scipy) when ``m2`` vanishes
    relative to the mean (all sizes equal) or there is one image. Warns with
    :class:`FewImagesWarning` below ``min_count`` images.
    """
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"min_count must be a positive int, got {min_count!r}")
    values = _as_float64(sizes)
    count = values.numel()
    if count < min_count:
        warnings.warn(
            f"imbalance statistics from {count} images (fewer than {min_count}): skewness and kurtosis "
            f"of so few foreground sizes are too noisy to choose a loss by",
            FewImagesWarning,
            stacklevel=2,
        )
    mean = float(values.mean())
    centred = values - mean
    m2 = float((centred**2).mean())
    if count < 2 or m2 <= (torch.finfo(torch.float64).eps * mean) ** 2:
        skewness = kurtosis = math.nan
    else:
        skewness = float((centred**3).mean()) / m2**1.5
        kurtosis = float((centred**4).mean()) / m2**2 - 3.0
    return ImbalanceStatistics(count, mean, math.sqrt(m2), skewness, kurtosis)


# --------------------------------------------------------------------------------------------
# Streaming accumulation over a dataset


def _extract_labels(item: object, label_key: object) -> torch.Tensor:
    if callable(label_key):
        labels = label_key(item)
    elif label_key is not None:
        labels = item[label_key]  # type: ignore[index]
    elif isinstance(item, dict):
        if "label" not in item:
            raise ValueError(f"a dict item needs label_key to name its label entry, got keys {sorted(item)}")
        labels = item["label"]
    elif isinstance(item, tuple | list):
        labels = item[-1]
    else:
        labels = item
    if not isinstance(labels, torch.Tensor) and hasattr(labels, "__array__"):
        labels = torch.as_tensor(labels)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"the label map of an item must be a tensor or array, got {type(labels).__name__}")
    return labels


class ForegroundSizeAccumulator:
    """Gathers per-image foreground sizes batch by batch, for :func:`imbalance_statistics`.

    ``foreground``: the classes whose voxels count as foreground (default ``1 .. num_classes - 1``).
    ``drop_empty``: leave images without foreground out of the statistics (ours; the sizes of
    every image stay available in :attr:`sizes`). ``backend``: as in :func:`foreground_sizes`.
    Sizes are kept on the labels' device until read, so :meth:`update` does not synchronise with
    a GPU.

    >>> acc = ForegroundSizeAccumulator(num_classes=2)
    >>> for batch in loader:
    ...     acc.update(batch["label"])
    >>> stats = acc.statistics()
    """

    def __init__(
        self,
        num_classes: int = 2,
        *,
        foreground: Sequence[int] | None = None,
        ignore_index: int | None = None,
        drop_empty: bool = True,
        backend: str = "auto",
    ) -> None:
        self.num_classes = _check_num_classes(num_classes)
        classes = list(range(1, num_classes)) if foreground is None else list(foreground)
        if not classes or any(isinstance(c, bool) or not isinstance(c, int) for c in classes):
            raise ValueError(f"foreground must be a non-empty sequence of class indices, got {foreground!r}")
        if any(not 0 <= c < num_classes for c in classes):
            raise ValueError(f"foreground classes must lie in [0, {num_classes}), got {classes}")
        self.foreground = tuple(classes)
        self.ignore_index = check_ignore_index(ignore_index, optional=True)
        self.drop_empty = bool(drop_empty)
        self.backend = backend
        self._chunks: list[torch.Tensor] = []

    def update(self, labels: torch.Tensor, *, batched: bool = True) -> torch.Tensor:
        """Add the images of a label batch ``(B, *spatial)`` (or one image with ``batched=False``).

        Float label maps (as many loaders produce) must hold integral values; they are converted.
        Returns the foreground sizes of these images (int64, on the labels' device).
        """
        if not isinstance(labels, torch.Tensor) and hasattr(labels, "__array__"):
            labels = torch.as_tensor(labels)  # numpy arrays
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a tensor or array, got {type(labels).__name__}")
        if not batched:
            labels = labels.unsqueeze(0)
        if labels.dim() == 1:
            labels = labels.unsqueeze(1)
        if labels.is_floating_point():
            if (labels.device.type == "cpu" or get_options().check_labels) and not bool(
                (labels == labels.round()).all()
            ):
                raise ValueError("a float label map must hold integral class values, got fractional values")
            labels = labels.long()
        counts = foreground_sizes(labels, self.num_classes, self.ignore_index, backend=self.backend)
        sizes = counts[:, list(self.foreground)].sum(1)
        self._chunks.append(sizes)
        return sizes

    @property
    def sizes(self) -> torch.Tensor:
        """Foreground size of every image seen so far (1-D int64, CPU), empty images included."""
        if not self._chunks:
            return torch.zeros(0, dtype=torch.int64)
        merged = torch.cat([chunk.cpu() for chunk in self._chunks])
        self._chunks = [merged]
        return merged

    def gathered_sizes(self) -> torch.Tensor:
        """:attr:`sizes` of every process of an initialised ``torch.distributed`` group, concatenated.

        With a ``DistributedSampler`` each rank sees only its shard; gathering makes every rank
        compute the same statistics and so choose the same loss. Without a process group (or
        with one process) this is :attr:`sizes`. Collective: every rank must call it.
        """
        sizes = self.sizes
        distributed = torch.distributed
        if not (distributed.is_available() and distributed.is_initialized()) or distributed.get_world_size() == 1:
            return sizes
        shards: list = [None] * distributed.get_world_size()
        distributed.all_gather_object(shards, sizes.tolist())
        return torch.tensor([size for shard in shards for size in shard], dtype=torch.int64)

    def statistics(self, *, min_count: int = MIN_IMAGES) -> ImbalanceStatistics:
        """:func:`imbalance_statistics` of the sizes gathered over all processes
        (:meth:`gathered_sizes`), without empty images if ``drop_empty``."""
        every = self.gathered_sizes()
        sizes = every[every > 0] if self.drop_empty else every
        if sizes.numel() == 0:
            raise ValueError(
                f"no image with foreground (classes {list(self.foreground)}) among the {every.numel()} seen"
            )
        return imbalance_statistics(sizes, min_count=min_count)

    @classmethod
    def from_loader(
        cls,
        data: Iterable,
        num_classes: int = 2,
        *,
        label_key: object = None,
        batched: bool | None = None,
        progress: bool = True,
        **kwargs,
    ) -> ForegroundSizeAccumulator:
        """One pass over a ``DataLoader``, a map-style dataset or any iterable of items.

        Each item is a label tensor, a ``(image, label)`` tuple / list (the last element is taken),
        or a dict with a ``"label"`` entry (MONAI); ``label_key`` (an index, a key or a callable on
        the item) picks another. ``batched``: whether items carry a batch axis (default: True for a
        ``DataLoader``, False otherwise). ``progress`` shows a tqdm bar when tqdm is installed.
        Other keywords go to the constructor.
        """
        accumulator = cls(num_classes, **kwargs)
        is_loader = isinstance(data, torch.utils.data.DataLoader)
        batched = is_loader if batched is None else batched
        items: Iterable = data
        if (
            not is_loader
            and not hasattr(data, "__iter__")
            and hasattr(data, "__getitem__")
            and hasattr(data, "__len__")
        ):
            items = (data[i] for i in range(len(data)))  # type: ignore[index]
        total = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
        if progress:
            try:
                from tqdm.auto import tqdm

                items = tqdm(items, total=total, desc="CALF foreground sizes", unit="batch" if batched else "image")
            except ImportError:
                pass
        for item in items:
            accumulator.update(_extract_labels(item, label_key), batched=batched)
        return accumulator
