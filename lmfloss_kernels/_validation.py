"""Argument checks shared by the functional API and the modules.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong
value or shape) with a message that names the argument, what was expected and what was given.
None of them synchronises with an accelerator unless :mod:`lmfloss_kernels._config` asks for
it (``check_labels``).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ._config import get_options
from ._plans import TargetReplay, recorded_target_check

REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_reduction(reduction: object) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction  # type: ignore[return-value]


def check_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number in ``[low, high]`` (open ends where asked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}: {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    too_low = low is not None and (value < low or (low_open and value == low))
    too_high = high is not None and (value > high or (high_open and value == high))
    if too_low or too_high:
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        opening = "(" if low_open or low is None else "["
        closing = ")" if high_open or high is None else "]"
        interval = f"{opening}{left}, {right}{closing}"
        raise ValueError(f"{name} must be in {interval}, got {value:g}")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}: {value!r}")
    return value


def check_ignore_index(value: object, *, optional: bool) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        expected = "an int or None" if optional else "an int"
        raise TypeError(f"ignore_index must be {expected}, got {type(value).__name__}: {value!r}")
    if not _representable(value, torch.int64):
        # Kernels and ops take it as an int64 (labels never exceed int64 either).
        raise ValueError(f"ignore_index must be in the int64 range [-2**63, 2**63 - 1], got {value}")
    return value


def check_logits(logits: object, *, dense: bool, min_classes: int = 2) -> torch.Tensor:
    """Floating-point logits with the class axis at dim 1 and at least ``min_classes`` classes.

    ``dense=True`` asks for ``(B, C, *S)`` with at least one spatial axis; otherwise ``(N, C)``
    rows are accepted too. Softmax losses need two classes; the sigmoid (multi-label) mode of
    the region losses passes ``min_classes=1`` (every channel is its own binary problem).
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    min_rank = 3 if dense else 2
    if logits.dim() < min_rank:
        shape = "(B, C, *spatial) with at least one spatial axis" if dense else "(N, C) or (B, C, *spatial)"
        raise ValueError(f"logits must have shape {shape}, got shape {tuple(logits.shape)}")
    if logits.shape[1] < min_classes:
        raise ValueError(
            f"logits must have at least {min_classes} classes on dim 1"
            f"{' (softmax over one class is constant)' if min_classes == 2 else ''}, got shape {tuple(logits.shape)}"
        )
    if logits.numel() == 0:
        raise ValueError(f"logits must not be empty, got shape {tuple(logits.shape)}")
    return logits


def _can_inspect(tensor: torch.Tensor) -> bool:
    """Whether value checks run on ``tensor``: always on CPU, on accelerators only with ``check_labels``.

    Meta tensors (shape-only, used by the modules' construction-time dry run) hold no values.
    While ``torch.compile`` traces, values are not known either (reading one would break the
    graph, and ``fullgraph=True`` would fail), so compiled code gets the accelerator default.
    """
    if tensor.device.type == "meta" or torch.compiler.is_compiling():
        return False
    return tensor.device.type == "cpu" or get_options().check_labels


def _check_same_device(target: torch.Tensor, logits: torch.Tensor) -> None:
    if target.device != logits.device:
        raise ValueError(f"target must be on the logits' device {logits.device}, got {target.device}")


def check_labels(logits: torch.Tensor, target: object, *, ignore_index: int | None) -> torch.Tensor:
    """Integer class labels for ``logits``; returns them with any singleton channel axis removed.

    Accepted: any integer dtype or bool, shape ``logits.shape[:1] + logits.shape[2:]`` or with a
    singleton channel axis at dim 1 (MONAI's ``B1H[WD]``). Values must lie in ``[0, C)`` or equal
    ``ignore_index``; that is verified on CPU tensors always and on other devices when the
    ``check_labels`` option is on (it needs a device-to-host sync).
    """
    return check_labels_coverage(logits, target, ignore_index=ignore_index)[0]


def _planned_labels(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int | None, coverage: bool = True):
    """:func:`check_labels_coverage` (``coverage=False``: :func:`check_labels`) for later calls with this
    call's signature (see ``_plans``).

    The type, dtype, device and shape checks passed and depend on nothing else; so do the channel
    axis to drop and whether values are inspected. Left: the label range, on every call.
    """
    squeeze = target.dim() == logits.dim()
    inspect = _can_inspect(target)
    num_classes = logits.shape[1]

    def replay(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, bool]:
        labels = target.squeeze(1) if squeeze else target
        return labels, inspect and check_label_range(labels, num_classes, ignore_index)

    def replay_labels(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels = target.squeeze(1) if squeeze else target
        if inspect:
            check_label_range(labels, num_classes, ignore_index)
        return labels

    chosen = replay if coverage else replay_labels
    chosen.native_replay = TargetReplay(
        dense=False, squeeze=squeeze, inspect=inspect, classes=num_classes, ignore_index=ignore_index,
        every_ignored_to_python=coverage,
    )  # fmt: skip
    return chosen


@recorded_target_check(_planned_labels)
def check_labels_coverage(
    logits: torch.Tensor, target: object, *, ignore_index: int | None
) -> tuple[torch.Tensor, bool]:
    """:func:`check_labels`, and whether every label is known to equal ``ignore_index`` (from the same range check).

    ``False`` when some label is not ignored, and whenever the values were not inspected.
    """
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex():
        raise TypeError(f"target must hold integer class labels for this loss, got dtype {target.dtype}")
    _check_same_device(target, logits)
    expected = logits.shape[:1] + logits.shape[2:]
    labels = target
    if labels.dim() == logits.dim() and labels.shape[1] == 1:
        labels = labels.squeeze(1)
    if labels.shape != expected:
        with_channel = tuple(logits.shape[:1]) + (1,) + tuple(logits.shape[2:])
        raise ValueError(
            f"target must have shape {tuple(expected)} or {with_channel} to match logits "
            f"{tuple(logits.shape)}, got {tuple(target.shape)}"
        )
    if _can_inspect(labels):
        return labels, check_label_range(labels, logits.shape[1], ignore_index)
    return labels, False


def check_label_range(
    labels: torch.Tensor, num_classes: int, ignore_index: int | None, *, name: str = "target labels"
) -> bool:
    """Raise ``ValueError`` if a label is outside ``[0, num_classes)`` and not ``ignore_index``.

    Returns whether every label equals ``ignore_index``. ``name``: how the error message names
    the tensor (the caller's argument name).

    One :func:`value_range` on the labels' own dtype. Only when that range is not inside
    ``[0, num_classes)`` (an ignored label, or a bad one) is a second one taken with the ignored
    labels replaced by 0 (always in range) instead of filtered out, so no int64 copy or
    boolean-indexed temporary is made.
    """
    if labels.numel() == 0:
        return False
    values = labels.view(torch.uint8) if labels.dtype == torch.bool else labels
    low, high = value_range(values)
    if low == high == ignore_index:
        return True
    if 0 <= low and high < num_classes:
        return False  # the usual case, whatever ignore_index: one pass, no temporary
    if ignore_index is not None and _representable(ignore_index, values.dtype):
        values = torch.where(values == ignore_index, torch.zeros((), dtype=values.dtype), values)
        low, high = value_range(values)
    if low < 0 or high >= num_classes:
        # Error path only: the range of the labels that are not ignored, for the message.
        kept = labels.long()
        kept = kept if ignore_index is None else kept[kept != ignore_index]
        low, high = int(kept.min()), int(kept.max())
        allowed = f"[0, {num_classes - 1}]" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
        raise ValueError(f"{name} must be in {allowed}, got values in [{low}, {high}]")
    return False


def value_range(values: torch.Tensor) -> list:
    """``[min, max]`` of a non-empty tensor as Python numbers, with one host sync; NaN propagates into both.

    ``torch.aminmax`` reads a contiguous tensor in one pass but first copies any other layout
    (an expanded or channels-last map would be materialised in full), so other layouts get
    ``amin`` and ``amax``: two passes, no temporary.
    """
    on_host = values.is_cpu
    if on_host and _ATEN_GRAIN < values.numel() <= SERIAL_ELEMENTS and values.dtype in _NUMPY:
        # Between ATen's grain and the kernels' one, ATen's reductions would wake an OpenMP team
        # that the kernels do not, which on a loaded machine costs milliseconds; NumPy reduces
        # serially, on a view of the same memory (any strides, no copy).
        array = values.detach().numpy()
        return [array.min().item(), array.max().item()]
    ends = torch.aminmax(values) if values.is_contiguous() else (values.amin(), values.amax())
    if on_host:
        # Nothing to wait for on the host: skip the stack. tolist, not item: the same Python numbers, and
        # measured (torch 2.14) the op call that follows an item() costs some 6 us more.
        return [end.tolist() for end in ends]
    return torch.stack(ends).tolist()


# Host checks of tensors up to this many elements run on the calling thread, as the CPU kernels
# do (csrc/cpu/tile.h kMinTaskElements): a small problem never pays for starting threads.
SERIAL_ELEMENTS = 1 << 20
_ATEN_GRAIN = 32768  # at::internal::GRAIN_SIZE: smaller reductions run serially in ATen already
# Dtypes NumPy reduces (not bfloat16); none when NumPy is not installed.
_NUMPY = (
    frozenset(
        {torch.float16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}
    )
    if importlib.util.find_spec("numpy") is not None
    else frozenset()
)


def _representable(value: int, dtype: torch.dtype) -> bool:
    info = torch.iinfo(dtype)
    return info.min <= value <= info.max


def _planned_target(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int | None):
    """:func:`check_target` for later calls with this call's signature (see ``_plans``): a label map's
    range, a dense map's ``[0, 1]`` range and its conversion to what the kernels read."""
    if not target.is_floating_point() and target.shape != logits.shape:
        return _planned_labels(logits, target, ignore_index=ignore_index, coverage=False)
    as_bytes = target.dtype == torch.bool
    inspect = _can_inspect(target)
    convert = not target.is_floating_point() and target.dtype not in (torch.uint8, torch.bool)

    def replay(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if as_bytes:
            target = target.view(torch.uint8)
        if inspect:
            check_soft_range(target)
        return target.to(torch.uint8) if convert else target

    if not convert:
        replay.native_replay = TargetReplay(
            dense=True, squeeze=False, inspect=inspect, classes=logits.shape[1], ignore_index=None,
            every_ignored_to_python=False,
        )  # fmt: skip
    return replay


@recorded_target_check(_planned_target)
def check_target(logits: torch.Tensor, target: object, *, ignore_index: int | None) -> torch.Tensor:
    """A region loss's target: a dense map of the logits' shape, or an integer label map.

    * Dense map ``(B, C, *S)``: float one-hot / soft map, or a bool / integer 0-1 one-hot /
      multi-hot map, returned as uint8 (bool is reinterpreted, no copy; other integer dtypes are
      converted) because that is what the kernels read natively.
    * Label map: integer labels (see :func:`check_labels`), when the shape is not the logits'.

    A dense map's entries must be finite and in ``[0, 1]``; that is verified where label ranges
    are (CPU tensors always, other devices with the ``check_labels`` option).
    """
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    dense = target.shape == logits.shape
    if not target.is_floating_point() and not dense:
        return check_labels(logits, target, ignore_index=ignore_index)
    if target.is_complex():
        raise TypeError(f"target must be a real (float, integer or bool) tensor, got dtype {target.dtype}")
    _check_same_device(target, logits)
    if not dense:
        raise ValueError(
            f"a floating-point target is a one-hot / soft map and must have the logits' shape "
            f"{tuple(logits.shape)}, got {tuple(target.shape)}; pass integer labels of shape "
            f"{tuple(logits.shape[:1] + logits.shape[2:])} for a label map"
        )
    if ignore_index is not None:
        raise ValueError(
            f"ignore_index={ignore_index} applies to integer label maps only; a one-hot / soft target "
            f"marks nothing to ignore (pass ignore_index=None or an integer label map)"
        )
    if target.dtype == torch.bool:
        target = target.view(torch.uint8)
    if _can_inspect(target):
        check_soft_range(target)
    if not target.is_floating_point() and target.dtype != torch.uint8:
        return target.to(torch.uint8)
    return target


def check_soft_range(target: torch.Tensor) -> None:
    """Raise ``ValueError`` unless every entry of a one-hot / soft map is finite and in ``[0, 1]``.

    Outside that range the losses lose their meaning without failing (a negative entry can make
    the loss negative). One :func:`value_range` on the target's own dtype: NaN propagates into
    both ends and +-inf lies outside ``[0, 1]``, so the one comparison covers non-finite entries
    too. Rows are not required to sum to 1.
    """
    low, high = value_range(target)
    if not (0.0 <= low and high <= 1.0):
        found = f"values in [{low:g}, {high:g}]"
        if math.isnan(low):
            # Error path only: the range of the other entries, for the message.
            others = target[~target.isnan()]
            found = "NaN entries" + (f" and values in [{others.min():g}, {others.max():g}]" if others.numel() else "")
        raise ValueError(f"target (a one-hot / soft map) must have every entry finite and in [0, 1], got {found}")


def _check_class_values(name: str, values: list[float], positive: bool) -> None:
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be finite, got {values}")
    if positive and any(v <= 0 for v in values):
        raise ValueError(f"{name} must be positive, got {values}")
    if not positive and any(v < 0 for v in values):
        raise ValueError(f"{name} must be non-negative, got {values}")


def class_sequence(name: str, value: Sequence, num_classes: int, *, positive: bool = False) -> tuple[float, ...]:
    """A per-class Python sequence checked in pure Python: ``num_classes`` finite numbers.

    No tensor is made, so nothing is copied to a device and ``torch.compile`` sees constants.
    """
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of numbers, got {value!r}") from None
    if len(values) != num_classes:
        raise ValueError(f"{name} must have one entry per class ({num_classes}), got shape ({len(values)},)")
    _check_class_values(name, values, positive)
    return tuple(values)


def is_sequence(value: object) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def as_class_values(value: object) -> object:
    """A NumPy array (any object with ``__array__``: ``np.bincount``'s result) as a tensor; else ``value``."""
    if not isinstance(value, torch.Tensor) and hasattr(value, "__array__") and not is_sequence(value):
        return torch.as_tensor(value)
    return value


def class_vector(
    name: str,
    value: object,
    num_classes: int,
    device: torch.device,
    *,
    positive: bool = False,
) -> torch.Tensor:
    """A per-class vector of length ``num_classes`` on ``device``.

    float64 for Python sequences, integer tensors and float64 tensors (all exact), float32 for
    other floating-point tensors; callers round it once to the dtype their logits need. NumPy
    arrays are taken as tensors (:func:`as_class_values`).
    """
    value = as_class_values(value)
    if is_sequence(value):
        values = class_sequence(name, value, num_classes, positive=positive)
        return torch.tensor(values, dtype=torch.float64, device=device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{name} must be a tensor, an array or a sequence of {num_classes} numbers, got {type(value).__name__}"
        )
    if value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must be a real tensor, got dtype {value.dtype}")
    vector = value.detach()
    if vector.dim() != 1 or vector.numel() != num_classes:
        raise ValueError(f"{name} must have one entry per class ({num_classes}), got shape {tuple(vector.shape)}")
    exact = vector.dtype == torch.float64 or not vector.is_floating_point()
    vector = per_class_on(name, vector, device, torch.float64 if exact else torch.float32)
    if _can_inspect(vector) and _checked.get(vector) != (vector._version, positive):
        _check_class_values(name, vector.tolist(), positive)
        _checked[vector] = (vector._version, positive)
    return vector


# Per-class tensors whose values passed _check_class_values, with their version counter then: a
# criterion's buffer (or a weight tensor passed at every call) is read on the host once, not at
# every call, and again after any in-place change.
_checked = WeakIdKeyDictionary()


def per_class_on(name: str, vector: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A per-class tensor moved to the logits' ``device`` and ``dtype`` (free when it is there already).

    Moving is the documented behaviour for per-class tensors on another device; a ``meta``
    tensor has no values to move (only the modules' construction-time dry run, whose logits are
    meta as well, may use one), and the fused kernels must never be handed one: they would read
    a null pointer or give a silently wrong loss.
    """
    if vector.device.type == "meta" and device.type != "meta":
        raise ValueError(
            f"{name} must hold values, got a meta tensor (a shape without data); "
            f"pass a tensor on a real device or a sequence of numbers"
        )
    return vector.to(device=device, dtype=dtype)


def check_class_counts(class_counts: object, num_classes: int, device: torch.device) -> torch.Tensor:
    """Per-class training-set counts: ``num_classes`` positive finite numbers."""
    if class_counts is None:
        raise TypeError("class_counts is required: the number of training samples of each class")
    counts = class_vector("class_counts", class_counts, num_classes, torch.device("cpu"), positive=True)
    return counts.to(device)
