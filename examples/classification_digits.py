"""Long-tailed digits: do LDAM, LMF, focal and re-weighting beat cross-entropy on the rare classes?

Data: scikit-learn's ``load_digits`` (1797 8x8 images, shipped inside the package). A balanced
held-out split of 50 images per class is set aside once; the training set is made long-tailed with
``n_r = round(120 * rho^(-r/9))`` images for the class of rank ``r`` (``rho`` = 10 and 60: 120 .. 12
and 120 .. 2 images). Which digit gets which rank is drawn per seed, so the rare classes are not
always the same digits.

Models: the MLP 64-128-10 and a small CNN (3x3 convolutions with 8 and 16 channels, 2x2 pooling, 64 hidden units),
each with a plain linear head or, where the recipe asks for it, the normalised-cosine head of
LDAM's code (``logits = cos(x, w_j)`` in [-1, 1], scaled by the loss's ``s = 30``).

Training (every configuration alike but one): SGD, momentum 0.9, lr 0.05 (0.005 for the row that says
so), weight decay 5e-4, batch 32,
60 epochs, lr x 0.1 at epochs 48 and 54 (80 % and 90 %, LDAM's schedule); deferred re-weighting
(DRW) switches the class weights to ``drw_weights(counts, 0.9999)`` at epoch 48, as LDAM's code
does at 160 of 200. The model of the last epoch is evaluated (no selection on the test split).

Run: ``python examples/classification_digits.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402

from lmfloss_kernels import FocalLoss, LDAMLoss, LMFLoss, drw_weights  # noqa: E402

NAME = "classification"
NUM_CLASSES = 10
TEST_PER_CLASS = 50
MAX_COUNT = 120
RATIOS = (10, 60)
RAREST = 3  # per-class F1 reported for this many rarest classes


def long_tailed_counts(ratio: float) -> list[int]:
    return [round(MAX_COUNT * ratio ** (-rank / (NUM_CLASSES - 1))) for rank in range(NUM_CLASSES)]


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train pool images, labels, test images, labels): 50 test images per class, fixed once."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.data / 16.0).astype(np.float32)  # (1797, 64), pixels in [0, 1]
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(0)
    test_index, pool_index = [], []
    for digit in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == digit))
        test_index.append(members[:TEST_PER_CLASS])
        pool_index.append(members[TEST_PER_CLASS:])
    test_index, pool_index = np.concatenate(test_index), np.concatenate(pool_index)
    return images[pool_index], labels[pool_index], images[test_index], labels[test_index]


def long_tailed_subset(images, labels, ratio: float, seed: int):
    """Training images of the pool, relabelled so that class r has ``long_tailed_counts(ratio)[r]`` images."""
    rng = np.random.default_rng(1000 + seed)
    digit_of_rank = rng.permutation(NUM_CLASSES)
    chosen_images, chosen_labels = [], []
    for rank, count in enumerate(long_tailed_counts(ratio)):
        members = rng.permutation(np.flatnonzero(labels == digit_of_rank[rank]))[:count]
        chosen_images.append(images[members])
        chosen_labels.append(np.full(count, rank))
    return np.concatenate(chosen_images), np.concatenate(chosen_labels), digit_of_rank


class CosineHead(nn.Module):
    """Normalised-cosine classifier of LDAM's code: ``cos(x, w_j)``, the loss applies the scale ``s``."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(features, classes).uniform_(-1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0)


def head(features: int, cosine: bool) -> nn.Module:
    return CosineHead(features, NUM_CLASSES) if cosine else nn.Linear(features, NUM_CLASSES)


def make_model(kind: str, cosine: bool) -> nn.Module:
    if kind == "MLP":
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), head(128, cosine))
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 64),
        nn.ReLU(),
        head(64, cosine),
    )


@dataclass(frozen=True)
class Recipe:
    """A loss, the head and learning rate it is trained with; ``drw``: ``drw_weights`` from the DRW epoch."""

    name: str
    cosine: bool = False
    drw: bool = False
    lr: float = 0.05

    def criterion(self, counts: list[int], reweight: bool):
        weights = drw_weights(counts) if reweight else None
        if self.name == "CE":
            return lambda logits, target: F.cross_entropy(logits, target)
        if self.name == "weighted CE":
            inverse = 1.0 / torch.tensor(counts, dtype=torch.float32)
            inverse = inverse * NUM_CLASSES / inverse.sum()
            return lambda logits, target: F.cross_entropy(logits, target, weight=inverse)
        if self.name == "focal":
            return FocalLoss(gamma=2.0)
        if self.name.startswith("LDAM"):
            return LDAMLoss(counts, weight=weights)  # max_m=0.5, s=30 as in LDAM's code
        if self.name.startswith("LMF"):
            # Defaults (alpha=beta=1, gamma=1.5, s=30, weight="margins"); with DRW the margin
            # weights give way to none, then to the DRW weights, as LDAM-DRW does.
            return LMFLoss(counts, weight=weights) if self.drw else LMFLoss(counts)
        raise ValueError(f"unknown recipe {self.name!r}")


RECIPES = (
    Recipe("CE"),
    Recipe("weighted CE"),
    Recipe("focal"),
    Recipe("LDAM (cos head)", cosine=True),
    Recipe("LDAM-DRW (cos head)", cosine=True, drw=True),
    Recipe("LMF (defaults)"),
    # s = 30 on unnormalised logits scales the gradient about 30-fold: the shared lr makes the
    # network collapse to one class, a tenth of it trains.
    Recipe("LMF (defaults, lr 0.005)", lr=0.005),
    Recipe("LMF (cos head)", cosine=True),
    Recipe("LMF-DRW (cos head)", cosine=True, drw=True),
)


def train(recipe: Recipe, kind: str, images, labels, counts, seed: int, epochs: int) -> nn.Module:
    common.seed_everything(seed)
    model = make_model(kind, recipe.cosine)
    optimiser = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.9, weight_decay=5e-4)
    decay_at = (int(0.8 * epochs), int(0.9 * epochs))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimiser, milestones=list(decay_at), gamma=0.1)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        criterion = recipe.criterion(counts, reweight=recipe.drw and epoch >= decay_at[0])
        model.train()
        for batch in torch.randperm(len(y), generator=generator).split(32):
            loss = criterion(model(x[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        scheduler.step()
    return model


def scores(model: nn.Module, images, labels) -> dict[str, float]:
    """Balanced accuracy, macro-F1 and per-class F1 (by rank) on the held-out split."""
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(images)).argmax(1).numpy()
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES))
    np.add.at(confusion, (labels, predicted), 1)
    tp = np.diag(confusion)
    recall = tp / confusion.sum(1)
    denominator = confusion.sum(0) + confusion.sum(1)
    f1 = np.divide(2 * tp, denominator, out=np.zeros(NUM_CLASSES), where=denominator > 0)
    return {"balanced_acc": float(recall.mean()), "macro_f1": float(f1.mean()), "f1": f1}


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    common.set_up(args.threads)
    clock = common.Stopwatch()
    seeds = range(2 if args.quick else 5)
    epochs = 2 if args.quick else 60
    pool_images, pool_labels, test_images, test_digits = load_digits_split()
    runs = []
    for ratio in RATIOS:
        counts = long_tailed_counts(ratio)
        for seed in seeds:
            images, labels, digit_of_rank = long_tailed_subset(pool_images, pool_labels, ratio, seed)
            rank_of_digit = np.argsort(digit_of_rank)
            test_labels = rank_of_digit[test_digits]
            for kind in ("MLP", "CNN"):
                for recipe in RECIPES:
                    model = train(recipe, kind, images, labels, counts, seed, epochs)
                    result = scores(model, test_images, test_labels)
                    row = {"model": kind, "ratio": ratio, "loss": recipe.name, "seed": seed}
                    row |= {k: common.finite(result[k]) for k in ("balanced_acc", "macro_f1")}
                    for position in range(1, RAREST + 1):  # f1_rarest1: the class with the fewest images
                        row[f"f1_rarest{position}"] = float(result["f1"][NUM_CLASSES - position])
                    runs.append(row)
            print(f"ratio {ratio} seed {seed} done ({clock.seconds():.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_csv(args.out / f"{NAME}_runs.csv", runs)
    summary_csv, summary_md = summarise(runs)
    common.write_csv(args.out / f"{NAME}.csv", summary_csv)
    sections = []
    for kind in ("MLP", "CNN"):
        for ratio in RATIOS:
            rows = [r for r in summary_md if r["model"] == kind and r["ratio"] == ratio]
            counts = long_tailed_counts(ratio)
            table = common.markdown_table([{k: v for k, v in r.items() if k not in ("model", "ratio")} for r in rows])
            sections.append((f"{kind}, imbalance ratio {ratio} (train counts {counts})", table))
    notes = [
        f"mean ± sd over {len(seeds)} seeds; {epochs} epochs; held-out split: {TEST_PER_CLASS} images per class",
        "F1 n=k: F1 of the class with k training images (the rarest three); CSV: f1_rarest1 = the rarest",
        f"ran in {clock.seconds():.0f} s on {common.machine()}",
    ]
    text = common.write_markdown(args.out / f"{NAME}.md", "Long-tailed digits", sections, notes)
    plot(summary_csv, args.out / f"{NAME}.png")
    print(text)


def summarise(runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """Mean and sd over seeds: numeric rows for the CSV, ``mean ± sd`` strings for the markdown."""
    keys = ["balanced_acc", "macro_f1"] + [f"f1_rarest{p}" for p in range(1, RAREST + 1)]
    numeric, shown = [], []
    for kind in ("MLP", "CNN"):
        for ratio in RATIOS:
            counts = long_tailed_counts(ratio)
            for recipe in RECIPES:
                group = [r for r in runs if r["model"] == kind and r["ratio"] == ratio and r["loss"] == recipe.name]
                row = {"model": kind, "ratio": ratio, "loss": recipe.name, "seeds": len(group)}
                text = dict(row)
                for key in keys:
                    values = [r[key] for r in group]
                    row[f"{key}_mean"], row[f"{key}_sd"] = common.mean_sd(values)
                    label = key if not key.startswith("f1_rarest") else f"F1 n={counts[NUM_CLASSES - int(key[-1])]}"
                    text[label] = common.pm(values)
                numeric.append(row)
                shown.append(text)
    return numeric, shown


def plot(summary: list[dict], path: Path) -> None:
    plt = common.quiet_matplotlib()
    figure, axes = plt.subplots(2, 2, figsize=(12, 9), sharex=True)
    names = [r.name for r in RECIPES]
    for row_axes, kind in zip(axes, ("MLP", "CNN"), strict=True):
        for axis, ratio in zip(row_axes, RATIOS, strict=True):
            rows = [r for r in summary if r["model"] == kind and r["ratio"] == ratio]
            y = np.arange(len(rows))
            for offset, key, label in ((-0.2, "balanced_acc", "balanced accuracy"), (0.2, "macro_f1", "macro-F1")):
                axis.barh(y + offset, [r[f"{key}_mean"] for r in rows], 0.4, xerr=[r[f"{key}_sd"] for r in rows],
                          label=label, capsize=2)  # fmt: skip
            axis.axvline(rows[0]["balanced_acc_mean"], color="grey", lw=0.8, ls="--")
            axis.set_yticks(y, names)
            axis.invert_yaxis()
            axis.set_xlim(0.0, 1.0)
            axis.set_title(f"{kind}, imbalance ratio {ratio}")
    axes[0][0].legend(loc="lower left")
    figure.suptitle("Long-tailed digits, held-out balanced split (mean ± sd over seeds; dashed: CE)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


if __name__ == "__main__":
    main()
