"""CALF statistics: per-image class counts, skewness / kurtosis, the streaming accumulator."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.stats
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lmfloss_kernels import ext
from lmfloss_kernels.calf import (
    FewImagesWarning,
    ForegroundSizeAccumulator,
    foreground_sizes,
    imbalance_statistics,
)

# The C++ kernel when the extension is loaded; the Triton kernel runs compiled on a GPU, else
# through the interpreter on CPU tensors (conftest).
BACKENDS = ["reference", *(["cpu"] if ext.LOAD_ERROR is None else []), "triton"]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _counts(labels, num_classes, ignore_index=None, backend="auto"):
    device = DEVICE if backend == "triton" else labels.device
    return foreground_sizes(labels.to(device), num_classes, ignore_index, backend=backend).cpu()


def _bincount_per_image(labels: torch.Tensor, num_classes: int, ignore_index: int | None) -> torch.Tensor:
    rows = []
    for image in labels:
        values = image.reshape(-1).long()
        if ignore_index is not None:
            values = values[values != ignore_index]
        rows.append(torch.bincount(values, minlength=num_classes))
    return torch.stack(rows)


def _random_labels(shape, num_classes, dtype, ignore_index=None, ignore_fraction=0.1):
    labels = torch.randint(0, num_classes, shape)
    if ignore_index is not None:
        labels[torch.rand(shape) < ignore_fraction] = ignore_index
    return labels.to(dtype)


# --------------------------------------------------------------------------------------------
# foreground_sizes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape, num_classes, dtype, ignore_index",
    [
        ((2, 7, 5, 3), 2, torch.uint8, None),
        ((3, 1, 11, 13), 4, torch.uint8, 255),
        ((2, 9, 10, 11), 5, torch.int64, -100),
        ((1, 4097), 3, torch.int32, None),
        ((2, 6, 7), 3, torch.int64, 0),  # ignore_index that is also a class: that class counts 0
        ((2, 5, 5), 40, torch.int16, None),  # more classes than one class tile of the kernel
    ],
)
def test_foreground_sizes_match_bincount(backend, shape, num_classes, dtype, ignore_index):
    labels = _random_labels(shape, num_classes, dtype, ignore_index)
    counts = _counts(labels, num_classes, ignore_index, backend)
    assert counts.dtype == torch.int64 and counts.shape == (shape[0], num_classes)
    assert torch.equal(counts, _bincount_per_image(labels, num_classes, ignore_index))


@pytest.mark.parametrize("backend", BACKENDS)
def test_foreground_sizes_bool_and_strided_labels(backend):
    mask = torch.rand(3, 12, 10) < 0.3
    assert torch.equal(_counts(mask, 2, backend=backend), _bincount_per_image(mask, 2, None))
    labels = _random_labels((4, 9, 8, 2), 3, torch.uint8).permute(0, 3, 2, 1)[::2]  # non-contiguous view
    assert not labels.is_contiguous()
    assert torch.equal(_counts(labels, 3, backend=backend), _bincount_per_image(labels, 3, None))
    expanded = _random_labels((1, 6, 7), 2, torch.int64).expand(3, 6, 7)
    assert torch.equal(_counts(expanded, 2, backend=backend), _bincount_per_image(expanded, 2, None))


def test_foreground_sizes_ignore_index_outside_dtype_marks_nothing():
    labels = _random_labels((2, 8, 8), 2, torch.uint8)
    for backend in BACKENDS:
        counts = _counts(labels, 2, -100, backend)
        assert torch.equal(counts, _bincount_per_image(labels, 2, None))


def test_foreground_sizes_bad_input():
    labels = torch.zeros(2, 4, 4, dtype=torch.uint8)
    with pytest.raises(TypeError, match="labels must be an integer"):
        foreground_sizes(labels.float(), 2)
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        foreground_sizes(labels.numpy(), 2)
    with pytest.raises(ValueError, match=r"labels must have shape \(B, \*spatial\)"):
        foreground_sizes(labels[0, 0], 2)
    with pytest.raises(TypeError, match="num_classes must be an int"):
        foreground_sizes(labels, 2.0)
    with pytest.raises(ValueError, match="num_classes must be at least 1"):
        foreground_sizes(labels, 0)
    for backend in BACKENDS:
        # The message names the argument: "labels", not "target labels".
        with pytest.raises(ValueError, match=r"^labels must be in \[0, 1\], got values in \[2, 2\]"):
            _counts(labels + 2, 2, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        foreground_sizes(labels, 2, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        foreground_sizes(labels, 2, backend="torch")


# --------------------------------------------------------------------------------------------
# imbalance_statistics


@pytest.mark.parametrize("kind", ["tensor", "list", "array"])
@pytest.mark.parametrize("count", [9, 57, 400])
def test_statistics_match_scipy(kind, count):
    rng = np.random.default_rng(count)
    sizes = np.round(rng.lognormal(7.0, 1.2, size=count))
    given = {"tensor": torch.from_numpy(sizes).long(), "list": sizes.tolist(), "array": sizes}[kind]
    stats = imbalance_statistics(given)
    assert stats.count == count
    assert stats.mean == pytest.approx(sizes.mean(), rel=1e-12)
    assert stats.std == pytest.approx(sizes.std(), rel=1e-12)
    assert stats.skewness == pytest.approx(scipy.stats.skew(sizes, bias=True), rel=1e-10, abs=1e-12)
    assert stats.kurtosis == pytest.approx(scipy.stats.kurtosis(sizes, fisher=True, bias=True), rel=1e-10, abs=1e-12)


def test_statistics_left_skewed_and_large_offsets():
    rng = np.random.default_rng(3)
    sizes = 1e6 - rng.exponential(1e3, size=200)  # big mean, small spread, negative skew
    stats = imbalance_statistics(torch.from_numpy(sizes))
    assert stats.skewness < -1
    assert stats.skewness == pytest.approx(scipy.stats.skew(sizes, bias=True), rel=1e-8)
    assert stats.kurtosis == pytest.approx(scipy.stats.kurtosis(sizes, bias=True), rel=1e-8)


def test_statistics_warn_below_min_count_and_undefined_cases():
    with pytest.warns(FewImagesWarning, match="from 3 images"):
        stats = imbalance_statistics([10, 20, 70])
    assert stats.skewness == pytest.approx(scipy.stats.skew([10, 20, 70], bias=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        imbalance_statistics([10, 20, 70], min_count=3)
        constant = imbalance_statistics([5] * 10)
        single = imbalance_statistics([7], min_count=1)
    assert math.isnan(constant.skewness) and math.isnan(constant.kurtosis)
    assert math.isnan(single.skewness) and single.std == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about the cancellation; it returns NaN too
        assert math.isnan(scipy.stats.skew(np.full(10, 5.0), bias=True))


def test_statistics_bad_input():
    with pytest.raises(ValueError, match="sizes must be 1-D"):
        imbalance_statistics(torch.ones(3, 3))
    with pytest.raises(ValueError, match="at least one"):
        imbalance_statistics([])
    with pytest.raises(ValueError, match="finite and non-negative"):
        imbalance_statistics([1, -2, 3, 4, 5, 6, 7, 8])
    with pytest.raises(TypeError, match="sizes must be"):
        imbalance_statistics("12345678")
    with pytest.raises(ValueError, match="min_count must be a positive int"):
        imbalance_statistics([1, 2, 3], min_count=0)


# --------------------------------------------------------------------------------------------
# Accumulator


def _maps_with_sizes(sizes, shape=(6, 7)):
    """Binary label maps whose foreground (label 1, then some label 2) has exactly ``sizes`` voxels."""
    voxels = math.prod(shape)
    maps = torch.zeros(len(sizes), voxels, dtype=torch.uint8)
    for i, size in enumerate(sizes):
        order = torch.randperm(voxels)[:size]
        maps[i, order] = 1
        maps[i, order[: size // 3]] = 2
    return maps.view(len(sizes), *shape)


def test_accumulator_batches_and_options():
    sizes = [0, 5, 17, 40, 3, 0, 29, 11, 8, 2, 1]
    maps = _maps_with_sizes(sizes)
    acc = ForegroundSizeAccumulator(num_classes=3)
    for start in range(0, len(sizes), 4):
        acc.update(maps[start : start + 4])
    assert acc.sizes.tolist() == sizes
    nonempty = [s for s in sizes if s > 0]
    stats = acc.statistics()
    assert stats.count == len(nonempty)
    assert stats.skewness == pytest.approx(scipy.stats.skew(nonempty, bias=True), rel=1e-10)

    only_two = ForegroundSizeAccumulator(num_classes=3, foreground=[2], drop_empty=False)
    only_two.update(maps)
    assert only_two.sizes.tolist() == [s // 3 for s in sizes]
    assert only_two.statistics().count == len(sizes)  # empty images kept

    floats = ForegroundSizeAccumulator(num_classes=3)
    floats.update(maps.float().unsqueeze(1))  # MONAI-style float (B, 1, H, W) masks
    for image in maps:
        floats.update(image, batched=False)
    assert floats.sizes.tolist() == sizes + sizes
    with pytest.raises(ValueError, match="integral"):
        floats.update(maps.float() / 2)


def test_accumulator_ignore_index_and_errors():
    labels = torch.tensor([[[1, 1, 255], [0, 255, 1]]], dtype=torch.uint8)
    acc = ForegroundSizeAccumulator(2, ignore_index=255)
    acc.update(labels)
    assert acc.sizes.tolist() == [3]
    empty = ForegroundSizeAccumulator(2)
    empty.update(torch.zeros(2, 3, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="no image with foreground"):
        empty.statistics()
    with pytest.raises(ValueError, match="foreground classes must lie in"):
        ForegroundSizeAccumulator(2, foreground=[2])
    with pytest.raises(ValueError, match="foreground must be a non-empty"):
        ForegroundSizeAccumulator(3, foreground=[])


class _DictDataset(Dataset):
    def __init__(self, maps):
        self.maps = maps

    def __len__(self):
        return len(self.maps)

    def __getitem__(self, index):
        return {"image": torch.zeros(1, 6, 7), "label": self.maps[index].unsqueeze(0).float()}


def test_accumulator_from_loaders_and_datasets():
    sizes = [4, 9, 1, 30, 12, 7, 0, 22, 16, 5]
    maps = _maps_with_sizes(sizes)
    images = torch.randn(len(sizes), 1, 6, 7)
    loader = DataLoader(TensorDataset(images, maps), batch_size=3)
    assert ForegroundSizeAccumulator.from_loader(loader, 3).sizes.tolist() == sizes
    dict_loader = DataLoader(_DictDataset(maps), batch_size=4)
    assert ForegroundSizeAccumulator.from_loader(dict_loader, 3, progress=False).sizes.tolist() == sizes
    assert ForegroundSizeAccumulator.from_loader(_DictDataset(maps), 3, progress=False).sizes.tolist() == sizes
    pairs = [(image, label) for image, label in zip(images, maps, strict=True)]
    by_key = ForegroundSizeAccumulator.from_loader(pairs, 3, label_key=1, progress=False)
    by_callable = ForegroundSizeAccumulator.from_loader(pairs, 3, label_key=lambda item: item[1].numpy())
    assert by_key.sizes.tolist() == sizes == by_callable.sizes.tolist()
    with pytest.raises(ValueError, match="needs label_key"):
        ForegroundSizeAccumulator.from_loader([{"mask": maps[0]}], 3, progress=False)


def test_accumulator_gathers_shards_of_a_process_group(monkeypatch):
    # Two ranks, simulated: the other rank's shard arrives through all_gather_object.
    acc = ForegroundSizeAccumulator(2)
    acc.update(_maps_with_sizes([4, 0, 9, 1], shape=(3, 5)).clamp_max(1))
    other = [7, 2, 0, 12, 5, 3]

    def all_gather_object(shards, mine):
        shards[0], shards[1] = mine, other

    distributed = torch.distributed
    monkeypatch.setattr(distributed, "is_available", lambda: True)
    monkeypatch.setattr(distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed, "all_gather_object", all_gather_object)
    assert acc.gathered_sizes().tolist() == [4, 0, 9, 1, *other]
    nonempty = [4, 9, 1, 7, 2, 12, 5, 3]
    stats = acc.statistics()
    assert stats.count == len(nonempty)
    assert stats.kurtosis == pytest.approx(scipy.stats.kurtosis(nonempty, bias=True), rel=1e-10)
