"""CALF on three data sets: the foreground-size statistics, the loss CALF picks, and how it does.

Data (synthetic, fixed once): 2D ``32 x 32`` images of Gaussian noise (sd 1) with one disc of
foreground (intensity +1.5) whose area is drawn from a different distribution per data set:

* **left-skewed**: ``260 - Gamma(1, 40)`` pixels (most objects large, a tail of small ones);
* **right-skewed, light tails**: 80 % small (15-30 pixels), 20 % large (180-260), a two-point
  mixture: skewed, but its kurtosis is low;
* **right-skewed, heavy tails**: log-normal, median 30 pixels, ``sigma = 0.9``.

Every area is clipped to 8-300 pixels.

``CALFLoss.from_dataset`` computes the skewness ``S`` and excess kurtosis ``K`` of the training
masks' foreground sizes and picks a loss by the package's rule table (only ``S <= -1 -> Fisher``
is the paper's; the other rows are the package's interpretation, see the README). Every data set
is then trained with each loss the table can pick (Fisher; arcsine + Dice; BCE + Dice, which is
also the Dice+CE baseline) and with Fisher + Dice (not in the table: it separates the effect of the
transformation from that of the Dice term), so the pick can be compared with the baseline and the rest.

Model: a two-level 2D U-Net (8, 16, 32 channels), one logit channel, Adam lr 3e-3, batch 4;
scored by the Dice of ``logit > 0`` per held-out image, over all images and over the third with
the smallest objects; 3 seeds (weights and batch order).

Run: ``python examples/calf_selection.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402

from lmfloss_kernels.calf import CALFLoss, FewImagesWarning  # noqa: E402

NAME = "calf"
SIZE = 32
INTENSITY = 1.5
# (name, transform, dice_coef): every loss the default rule table can pick, and Fisher + Dice, which it
# cannot (the table's Fisher row has no Dice term), to tell the transformation from the missing Dice.
CANDIDATES = (
    ("Fisher", "fisher", 0.0),
    ("Fisher+Dice", "fisher", 1.0),
    ("arcsine+Dice", "arcsine", 1.0),
    ("BCE+Dice", "ln", 1.0),
)
BASELINE = "BCE+Dice"


def draw_areas(kind: str, count: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "left-skewed":
        areas = 260 - rng.gamma(1.0, 40.0, count)
    elif kind == "right-skewed, light tails":
        large = rng.permutation(np.arange(count) < round(0.2 * count))  # exactly a fifth: S and K as intended
        areas = np.where(large, rng.uniform(180, 260, count), rng.uniform(15, 30, count))
    else:
        areas = np.exp(rng.normal(np.log(30.0), 0.9, count))
    return np.clip(areas, 8, 300)


DATASETS = ("left-skewed", "right-skewed, light tails", "right-skewed, heavy tails")


def make_images(kind: str, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 images ``(N, 1, S, S)`` and uint8 masks ``(N, S, S)``, one disc of the drawn area each."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    images = rng.normal(0.0, 1.0, (count, 1, SIZE, SIZE)).astype(np.float32)
    masks = np.zeros((count, SIZE, SIZE), np.uint8)
    for n, area in enumerate(draw_areas(kind, count, rng)):
        radius = np.sqrt(area / np.pi)
        cy, cx = rng.uniform(radius, SIZE - 1 - radius, 2)
        masks[n] = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        images[n, 0][masks[n] == 1] += INTENSITY
    return torch.from_numpy(images), torch.from_numpy(masks)


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.InstanceNorm2d(cout, affine=True), nn.LeakyReLU(0.01))


class UNet2D(nn.Module):
    """Two-level U-Net with one output channel (the CALF losses take single-channel logits)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.enc1, self.enc2, self.bottom = block(1, width), block(width, 2 * width), block(2 * width, 4 * width)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2), block(4 * width, 2 * width)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2), block(2 * width, width)
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        b = self.bottom(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        return self.out(self.dec1(torch.cat([self.up1(d2), e1], 1)))


def train(criterion: CALFLoss, images, masks, seed: int, steps: int) -> nn.Module:
    return common.train_segmenter(UNet2D, criterion, images, masks, seed, steps, batch_size=4, lr=3e-3)


def dice_scores(model: nn.Module, images, masks) -> np.ndarray:
    """Dice of ``logit > 0`` per held-out image."""
    model.eval()
    with torch.no_grad():
        predicted = model(images)[:, 0] > 0
    truth = masks.bool()
    intersection = (predicted & truth).sum((1, 2)).double()
    total = (predicted.sum((1, 2)) + truth.sum((1, 2))).double()
    return (2 * intersection / total).numpy()


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    common.set_up(args.threads)
    clock = common.Stopwatch()
    seeds = range(1 if args.quick else 3)
    steps = 10 if args.quick else 150
    train_count, test_count = (16, 12) if args.quick else (48, 30)
    runs, stats_rows, summary, shown = [], [], [], []
    sizes_by_dataset = {}
    for index, kind in enumerate(DATASETS):
        images, masks = make_images(kind, train_count, seed=10 * index)
        test_images, test_masks = make_images(kind, test_count, seed=10 * index + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FewImagesWarning)  # the quick run has 16 images
            picked = CALFLoss.from_dataset([masks], batched=True, progress=False)
        selection = picked.selection
        stats = selection.statistics
        picked_name = next(n for n, t, d in CANDIDATES if (t, d) == (selection.transform, selection.dice_coef))
        sizes_by_dataset[kind] = masks.sum((1, 2)).numpy()
        stats_rows.append({"dataset": kind, "images": stats.count, "size_mean": stats.mean, "size_sd": stats.std,
                           "skewness": stats.skewness, "kurtosis": stats.kurtosis, "rule": selection.index,
                           "picked": picked_name})  # fmt: skip
        small = np.argsort(test_masks.sum((1, 2)).numpy(), kind="stable")[: max(1, test_count // 3)]
        for name, transform, dice_coef in CANDIDATES:
            criterion = CALFLoss(transform, dice_coef=dice_coef)
            dice_all, dice_small = [], []
            for seed in seeds:
                scores = dice_scores(train(criterion, images, masks, seed, steps), test_images, test_masks)
                dice_all.append(common.finite(float(scores.mean())))
                dice_small.append(common.finite(float(scores[small].mean())))
                runs.append({"dataset": kind, "loss": name, "seed": seed, "dice": dice_all[-1],
                             "dice_small_third": dice_small[-1]})  # fmt: skip
            row = {"dataset": kind, "loss": name, "picked_by_calf": name == picked_name, "seeds": len(dice_all)}
            text = dict(row, picked_by_calf="**yes**" if name == picked_name else "")
            for column, values in (("dice", dice_all), ("dice_small_third", dice_small)):
                row[f"{column}_mean"], row[f"{column}_sd"] = common.mean_sd(values)
                text[column] = common.pm(values)
            summary.append(row)
            shown.append(text)
            print(f"{kind} / {name}: {text} ({clock.seconds():.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_csv(args.out / f"{NAME}_statistics.csv", stats_rows)
    common.write_csv(args.out / f"{NAME}_runs.csv", runs)
    common.write_csv(args.out / f"{NAME}.csv", summary)
    stats_shown = [{**r, **{k: f"{r[k]:.3g}" for k in ("size_mean", "size_sd", "skewness", "kurtosis")}}
                   for r in stats_rows]  # fmt: skip
    notes = [
        f"{train_count} training and {test_count} held-out {SIZE}x{SIZE} images per data set; {steps} steps of batch 4",
        f"mean ± sd over {len(seeds)} seeds; dice_small_third: the held-out third with the smallest objects",
        "BCE+Dice (transform ln + 1 x Dice) is the Dice+CE baseline; Fisher has no Dice term (the table's row 1)",
        f"ran in {clock.seconds():.0f} s on {common.machine()}",
    ]
    sections = [
        ("Statistics of the training masks and CALF's pick", common.markdown_table(stats_shown)),
        ("Held-out Dice of each loss the table can pick, and of Fisher+Dice", common.markdown_table(shown)),
    ]
    text = common.write_markdown(args.out / f"{NAME}.md", "CALF: statistics, pick and outcome", sections, notes)
    plot(stats_rows, summary, sizes_by_dataset, args.out / f"{NAME}.png")
    print(text)


def plot(stats_rows, summary, sizes_by_dataset, path: Path) -> None:
    plt = common.quiet_matplotlib()
    figure, axes = plt.subplots(2, len(DATASETS), figsize=(13, 7))
    for column, stats in enumerate(stats_rows):
        kind = stats["dataset"]
        top, bottom = axes[0][column], axes[1][column]
        top.hist(sizes_by_dataset[kind], bins=20, color="grey")
        top.set_title(f"{kind}\nS = {stats['skewness']:.2f}, K = {stats['kurtosis']:.2f} -> {stats['picked']}")
        top.set_xlabel("foreground size (pixels)")
        rows = [r for r in summary if r["dataset"] == kind]
        colours = ["tab:orange" if r["picked_by_calf"] else "tab:blue" for r in rows]
        bottom.bar([r["loss"] for r in rows], [r["dice_mean"] for r in rows], yerr=[r["dice_sd"] for r in rows],
                   color=colours, capsize=3)  # fmt: skip
        bottom.set_ylim(0, 1)
        bottom.set_ylabel("held-out Dice (orange: CALF's pick)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


if __name__ == "__main__":
    main()
