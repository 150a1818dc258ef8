"""The drop-in criteria: ``lmfloss_kernels.monai`` / ``.nnunet`` classes against the classes they replace.

A drop-in workload is one class with fixed constructor arguments, built twice: ours
(``lmfloss_kernels.<module>.<name>(**kwargs, backend=...)``) and the library's own
(``monai.losses.<name>(**kwargs)``, ``nnunetv2``'s ``<name>(**kwargs)``). Both compute the same
function, so the library's class is the baseline, its ``torch.compile`` the compiled one.

Targets are what those pipelines feed: a ``(B, 1, *S)`` uint8 label map (``to_onehot_y=True``,
nnU-Net), or a ``(B, C, *S)`` multi-hot map of overlapping nested regions for the sigmoid
criteria (BraTS: whole tumour contains tumour core contains enhancing tumour), in the logits'
dtype as MONAI's transforms produce it.

Some option sets are not fused yet: our class then computes the loss with the library's class (or
eager PyTorch), with a warning. :func:`call_path` tells which path a call took, so that such a row
is labelled delegated and never reported as ours.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

FUSED, DELEGATED = "fused", "delegated"
# Packages whose modules, when called during one of our criteria's calls, mean it delegated.
_LIBRARIES = ("monai", "nnunetv2")
# Where the library classes live.
_THEIRS = {"monai": "monai.losses", "nnunetv2": "nnunetv2.training.loss.compound_losses"}
_OURS = {"monai": "lmfloss_kernels.monai", "nnunetv2": "lmfloss_kernels.nnunet"}


@dataclass(frozen=True)
class DropIn:
    library: str  # "monai" or "nnunetv2": whose class ours replaces
    class_name: str  # the same name in both packages
    kwargs: Callable[[bool], dict]  # constructor arguments; the flag: for the library's class (else ours)
    target_kind: str  # "labels" ((B, 1, *S) label map) or "multihot" ((B, C, *S))

    @property
    def provider(self) -> str:
        """The runner's provider name of the library's own class."""
        return "monai" if self.library == "monai" else "nnunet"

    def ours(self, backend: str) -> nn.Module:
        module = importlib.import_module(_OURS[self.library])
        return getattr(module, self.class_name)(**self.kwargs(False), backend=backend)

    def theirs(self) -> nn.Module | None:
        """The library's class, or None when the library is not installed."""
        try:
            module = importlib.import_module(_THEIRS[self.library])
        except ImportError:
            return None
        return getattr(module, self.class_name)(**self.kwargs(True))


def _nnunet_dc_and_ce(theirs: bool) -> dict:
    # nnU-Net v2's default trainer: batch_dice off (2D/3d_fullres without batch dice), no background
    # in the Dice term, smooth 1e-5, the memory-efficient Dice class.
    dice_class = None
    if theirs:
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

        dice_class = MemoryEfficientSoftDiceLoss
    soft_dice = {"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}
    return dict(soft_dice_kwargs=soft_dice, ce_kwargs={}, weight_ce=1, weight_dice=1, dice_class=dice_class)


DROPINS: dict[str, tuple[str, DropIn]] = {
    "monai_dice_ce": (
        "MONAI DiceCELoss(to_onehot_y=True, softmax=True)",
        DropIn("monai", "DiceCELoss", lambda theirs: dict(to_onehot_y=True, softmax=True), "labels"),
    ),
    "monai_dice_focal": (
        "MONAI DiceFocalLoss(to_onehot_y=True, softmax=True)",
        DropIn("monai", "DiceFocalLoss", lambda theirs: dict(to_onehot_y=True, softmax=True), "labels"),
    ),
    "monai_dice_sigmoid": (
        "MONAI DiceLoss(sigmoid=True), multi-hot regions",
        DropIn("monai", "DiceLoss", lambda theirs: dict(sigmoid=True), "multihot"),
    ),
    "monai_dice_focal_sigmoid": (
        "MONAI DiceFocalLoss(sigmoid=True), multi-hot regions",
        DropIn("monai", "DiceFocalLoss", lambda theirs: dict(sigmoid=True), "multihot"),
    ),
    "nnunet_dc_ce": (
        "nnU-Net v2 DC_and_CE_loss (default trainer: do_bg=False, smooth=1e-5)",
        DropIn("nnunetv2", "DC_and_CE_loss", _nnunet_dc_and_ce, "labels"),
    ),
}


def make_target(dropin: DropIn, logits: torch.Tensor) -> torch.Tensor:
    """A random target for ``logits`` ``(B, C, *S)``, as the library's pipelines give it.

    Label map: ``(B, 1, *S)`` uint8 classes in ``[0, C)``. Multi-hot: channel ``c`` is ``level > c``
    for a random ``level`` in ``[0, C]`` per voxel, so the regions nest and overlap.
    """
    batch, num_classes, *spatial = logits.shape
    if dropin.target_kind == "labels":
        return torch.randint(0, num_classes, (batch, 1, *spatial), device=logits.device, dtype=torch.uint8)
    level = torch.randint(0, num_classes + 1, (batch, 1, *spatial), device=logits.device)
    channels = torch.arange(num_classes, device=logits.device).view(1, -1, *([1] * len(spatial)))
    return (level > channels).to(logits.dtype)


def call_path(fn: Callable, logits: torch.Tensor, target: torch.Tensor) -> tuple[str, str]:
    """``(FUSED or DELEGATED, reason)`` of one call ``fn(logits, target)``.

    Delegated when a module of MONAI or nnU-Net ran during the call (a global forward hook sees
    it) or when the criterion warned that it is "not fused". The package warns once per process
    and reason, so the record of reasons already warned is emptied for the call and restored.
    """
    from lmfloss_kernels import _compat

    ran: list[str] = []

    def hook(module, args):
        top = type(module).__module__.split(".")[0]
        if top in _LIBRARIES:
            ran.append(f"{type(module).__module__}.{type(module).__qualname__}")

    warned = getattr(_compat, "_warned", None)
    saved = set(warned) if warned is not None else None
    if warned is not None:
        warned.clear()
    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            fn(logits, target)
    finally:
        handle.remove()
        if warned is not None:
            warned.update(saved)
    messages = [str(w.message) for w in caught if "not fused" in str(w.message)]
    if messages:
        return DELEGATED, messages[0]
    if ran:
        return DELEGATED, f"{ran[0]} ran"
    return FUSED, ""
