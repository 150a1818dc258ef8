"""3D segmentation of two small structures (< 1 % foreground): which region / focal loss finds them?

Data (synthetic, fixed once): 24^3 volumes of Gaussian noise (sd 1) holding one ellipsoid of
class 1 (semi-axes 2 to 3 voxels, about 35-110 voxels, intensity +2) and one ball of class 2
(radius 1.5 to 2, about 15-35 voxels, intensity +3), at random places. Foreground is about 0.6 %
of the voxels (class 1 about 0.45 %, class 2 about 0.15 %).

Model: a two-level 3D U-Net (4, 8, 16 channels, instance norm), Adam lr 1e-2, batch 2, 300 steps. Every
loss is trained with the fused criterion (``backend="cpu"``, the C++ extension; the same function
as the eager reference to float32 rounding) and scored by per-class Dice of the arg-max on
held-out volumes, for 3 seeds (weights and batch order; the data stay the same).

Timing: for each loss, the median time of the criterion alone (forward + backward on the training
batch's logits) and of a whole training step, with the fused (``"cpu"``) and the eager
(``"reference"``) criterion side by side. Times depend on the machine and its load; the Dice
scores do not (one thread, deterministic kernels).

Run: ``python examples/segmentation_3d.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402

from lmfloss_kernels import (  # noqa: E402
    DiceLoss,
    FocalLoss,
    FocalTverskyLoss,
    MixedFocalLoss,
    TverskyLoss,
    UnifiedFocalLoss,
)

NAME = "segmentation"
SIZE = 24
NUM_CLASSES = 3


def make_volumes(count: int, seed: int, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` (image, label) pairs: float32 images ``(N, 1, S, S, S)``, uint8 labels ``(N, S, S, S)``."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).astype(np.float32)
    images = np.empty((count, 1, size, size, size), np.float32)
    labels = np.zeros((count, size, size, size), np.uint8)
    for n in range(count):
        image = rng.normal(0.0, 1.0, (size, size, size)).astype(np.float32)
        for label, radii, intensity in ((1, (2.0, 3.0), 2.0), (2, (1.5, 2.0), 3.0)):
            centre = rng.uniform(4, size - 4, 3)
            axes = rng.uniform(*radii, 3) if label == 1 else np.full(3, rng.uniform(*radii))
            inside = (((grid - centre) / axes) ** 2).sum(-1) <= 1.0
            inside &= labels[n] == 0
            labels[n][inside] = label
            image[inside] += intensity
        images[n, 0] = image
    return torch.from_numpy(images), torch.from_numpy(labels)


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1), nn.InstanceNorm3d(cout, affine=True), nn.LeakyReLU(0.01))


class UNet3D(nn.Module):
    """Two-level U-Net: 4 -> 8 -> 16 channels down, transposed convolutions and skips up."""

    def __init__(self, classes: int = NUM_CLASSES, width: int = 4) -> None:
        super().__init__()
        self.enc1, self.enc2 = block(1, width), block(width, 2 * width)
        self.bottom = block(2 * width, 4 * width)
        self.up2, self.dec2 = nn.ConvTranspose3d(4 * width, 2 * width, 2, stride=2), block(4 * width, 2 * width)
        self.up1, self.dec1 = nn.ConvTranspose3d(2 * width, width, 2, stride=2), block(2 * width, width)
        self.out = nn.Conv3d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool3d(e1, 2))
        b = self.bottom(F.max_pool3d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.out(d1)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target.long())


def sum_of(*criteria: Callable) -> Callable:
    return lambda logits, target: sum(criterion(logits, target) for criterion in criteria)


def make_losses(backend: str) -> dict[str, Callable]:
    """Each loss at its authors' defaults, the package's criteria on ``backend``."""
    dice = DiceLoss(backend=backend)
    return {
        "CE": cross_entropy,
        "Dice": dice,
        "Dice+CE": sum_of(dice, cross_entropy),
        "Dice+focal": sum_of(dice, FocalLoss(gamma=2.0, backend=backend)),
        "Tversky": TverskyLoss(backend=backend),
        "focal Tversky": FocalTverskyLoss(backend=backend),
        "Unified Focal (sym)": UnifiedFocalLoss(asymmetric=False, backend=backend),
        "Unified Focal (asym)": UnifiedFocalLoss(backend=backend),
        "Mixed Focal": MixedFocalLoss(backend=backend),
    }


def train(criterion: Callable, images, labels, seed: int, steps: int) -> nn.Module:
    return common.train_segmenter(UNet3D, criterion, images, labels, seed, steps, batch_size=2, lr=1e-2)


def dice_per_class(model: nn.Module, images, labels) -> np.ndarray:
    """Mean over held-out volumes of each foreground class's Dice of the arg-max (``(C - 1,)``)."""
    model.eval()
    scores = []
    with torch.no_grad():
        for image, label in zip(images.split(2), labels.split(2), strict=True):
            predicted = model(image).argmax(1)
            for c in range(1, NUM_CLASSES):
                p, g = predicted == c, label == c
                intersection = (p & g).sum((1, 2, 3)).double()
                total = (p.sum((1, 2, 3)) + g.sum((1, 2, 3))).double()
                scores.append(torch.where(total > 0, 2 * intersection / total.clamp(min=1), 1.0).numpy())
    per_batch = np.array(scores).reshape(-1, NUM_CLASSES - 1, 2)  # (batches, class, image)
    return per_batch.transpose(1, 0, 2).reshape(NUM_CLASSES - 1, -1).mean(1)


def timings(name: str, images, labels, repeats: int) -> dict[str, float]:
    """Median ms of the criterion alone (forward + backward) and of a training step, fused and eager."""
    common.seed_everything(0)
    model = UNet3D()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = images[:2], labels[:2]
    logits = model(x).detach().requires_grad_(True)
    result = {}
    for label, backend in (("fused", "cpu"), ("eager", "reference")):
        criterion = make_losses(backend)[name]

        def loss_only(criterion=criterion):
            logits.grad = None
            criterion(logits, y).backward()

        def step(criterion=criterion):
            loss = criterion(model(x), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()

        result[f"loss_ms_{label}"] = common.median_ms(loss_only, repeats)
        result[f"step_ms_{label}"] = common.median_ms(step, max(3, repeats // 4), warmup=1)
    return result


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    common.set_up(args.threads)
    clock = common.Stopwatch()
    quick = args.quick
    size = 24 if quick else SIZE
    train_images, train_labels = make_volumes(8 if quick else 24, seed=0, size=size)
    test_images, test_labels = make_volumes(4 if quick else 12, seed=1, size=size)
    seeds = range(1 if quick else 3)
    steps = 6 if quick else 300
    foreground = [float((train_labels == c).double().mean()) for c in range(1, NUM_CLASSES)]
    runs, summary, shown = [], [], []
    for name, criterion in make_losses("cpu").items():
        per_seed = []
        for seed in seeds:
            dice = dice_per_class(train(criterion, train_images, train_labels, seed, steps), test_images, test_labels)
            per_seed.append(dice)
            runs.append({"loss": name, "seed": seed, "dice_large": float(dice[0]), "dice_small": float(dice[1]),
                         "dice_mean": float(dice.mean())})  # fmt: skip
        times = timings(name, train_images, train_labels, repeats=3 if quick else 20)
        per_seed = np.array(per_seed)
        row = {"loss": name, "seeds": len(per_seed)}
        text = dict(row)
        for column, values in (("dice_large", per_seed[:, 0]), ("dice_small", per_seed[:, 1]),
                               ("dice_mean", per_seed.mean(1))):  # fmt: skip
            row[f"{column}_mean"], row[f"{column}_sd"] = common.mean_sd(values)
            text[column] = common.pm(values)
        row |= {k: common.finite(v) for k, v in times.items()}
        text |= {k.replace("_", " "): f"{v:.1f}" for k, v in times.items()}
        summary.append(row)
        shown.append(text)
        print(f"{name}: {text} ({clock.seconds():.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_csv(args.out / f"{NAME}_runs.csv", runs)
    common.write_csv(args.out / f"{NAME}.csv", summary)
    notes = [
        f"{len(train_labels)} training and {len(test_labels)} held-out volumes of {size}^3; foreground fraction "
        f"class 1 (large) {100 * foreground[0]:.2f} %, class 2 (small) {100 * foreground[1]:.3f} %",
        f"mean ± sd over {len(seeds)} seeds, {steps} steps of batch 2; Dice of the arg-max per held-out volume",
        "ms: median wall time; loss = criterion forward + backward on (2, 3, S, S, S) logits; step = network "
        "forward + loss + backward + Adam; fused = backend 'cpu', eager = backend 'reference' (CE is torch's)",
        f"ran in {clock.seconds():.0f} s on {common.machine()}; times vary with machine load, Dice does not",
    ]
    text = common.write_markdown(args.out / f"{NAME}.md", "3D segmentation, two small structures",
                                 [("", common.markdown_table(shown))], notes)  # fmt: skip
    plot(summary, args.out / f"{NAME}.png")
    print(text)


def plot(summary: list[dict], path: Path) -> None:
    plt = common.quiet_matplotlib()
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    x = np.arange(len(summary))
    names = [r["loss"] for r in summary]
    for offset, key, label in ((-0.2, "dice_large", "class 1 (large)"), (0.2, "dice_small", "class 2 (small)")):
        left.bar(x + offset, [r[f"{key}_mean"] for r in summary], 0.4, yerr=[r[f"{key}_sd"] for r in summary],
                 label=label, capsize=2)  # fmt: skip
    left.set_xticks(x, names, rotation=35, ha="right")
    left.set_ylim(0, 1)
    left.set_ylabel("held-out Dice (mean ± sd over seeds)")
    left.legend()
    for offset, key, label in ((-0.2, "loss_ms_eager", "eager (reference)"), (0.2, "loss_ms_fused", "fused (cpu)")):
        right.bar(x + offset, [r[key] for r in summary], 0.4, label=label)
    right.set_xticks(x, names, rotation=35, ha="right")
    right.set_ylabel("criterion forward + backward, ms")
    right.legend()
    figure.suptitle("3D segmentation, < 1 % foreground in two classes")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


if __name__ == "__main__":
    main()
