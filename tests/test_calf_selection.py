"""CALF selection: every branch of the rule table, overrides, and the two-line recipe from a data set."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch.utils.data import DataLoader, TensorDataset

from lmfloss_kernels import ext
from lmfloss_kernels.calf import (
    DEFAULT_RULES,
    CALFLoss,
    ImbalanceStatistics,
    SelectionRule,
    select_loss,
    transform_loss,
)


def _stats(skewness: float, kurtosis: float, count: int = 50) -> ImbalanceStatistics:
    return ImbalanceStatistics(count, 100.0, 10.0, skewness, kurtosis)


@pytest.mark.parametrize(
    "skewness, kurtosis, index, transform, dice_coef, source",
    [
        (-3.0, 10.0, 1, "fisher", 0.0, "paper"),
        (-1.0, 0.0, 1, "fisher", 0.0, "paper"),  # S = -1 belongs to the paper's row
        (-0.999, 0.0, 2, "ln", 1.0, "ours"),
        (0.0, 50.0, 2, "ln", 1.0, "ours"),
        (0.999, -1.0, 2, "ln", 1.0, "ours"),
        (1.0, 2.999, 3, "arcsine", 1.0, "ours"),
        (4.0, -1.2, 3, "arcsine", 1.0, "ours"),
        (1.0, 3.0, 4, "ln", 1.0, "ours"),
        (2.5, 12.0, 4, "ln", 1.0, "ours"),
        (math.nan, math.nan, 5, "ln", 1.0, "ours"),  # undefined statistics
        (2.0, math.nan, 5, "ln", 1.0, "ours"),
    ],
)
def test_default_table_branches(skewness, kurtosis, index, transform, dice_coef, source):
    selection = select_loss(_stats(skewness, kurtosis))
    assert selection.index == index
    assert selection.rule is DEFAULT_RULES[index - 1]
    assert (selection.transform, selection.dice_coef, selection.rule.source) == (transform, dice_coef, source)
    reason = selection.reason
    assert f"rule {index} '{selection.rule.condition}'" in reason
    assert ("from the CALF paper" in reason) == (source == "paper")
    assert "S = " in str(selection) and "50 images" in str(selection)


def test_rule_overrides_and_condition_grammar():
    rules = [("S <= -1", "fisher"), ("not (K < 3) or S > 5", "log10", 1.0), ("otherwise", "logit", 0.5)]
    assert select_loss(_stats(-2.0, 0.0), rules).transform == "fisher"
    chosen = select_loss(_stats(0.0, 3.5), rules)
    assert (chosen.index, chosen.transform, chosen.dice_coef) == (2, "log10", 1.0)
    assert select_loss(_stats(6.0, 0.0), rules).transform == "log10"
    assert select_loss(_stats(0.0, 0.0), rules).transform == "logit"
    assert select_loss(_stats(0.5, 0.0), [SelectionRule("0 <= S < 1 and K == 0", "arcsine")]).transform == "arcsine"
    with pytest.raises(ValueError, match="no rule matches"):
        select_loss(_stats(0.0, 0.0), [("S > 0", "ln")])
    for bad in ("__import__('os').system('true')", "S + 1", "S <= x", "S <=", "S in [1]"):
        with pytest.raises(ValueError, match="is not 'otherwise' or an expression"):
            SelectionRule(bad, "ln")
    with pytest.raises(ValueError, match="transform must be one of"):
        SelectionRule("S > 0", "sqrt")
    with pytest.raises(ValueError, match="dice_coef must be in"):
        SelectionRule("S > 0", "ln", -1.0)
    with pytest.raises(TypeError, match="a rule must be"):
        select_loss(_stats(0.0, 0.0), ["S > 0"])
    with pytest.raises(ValueError, match="at least one row"):
        select_loss(_stats(0.0, 0.0), [])
    with pytest.raises(TypeError, match="statistics must be an ImbalanceStatistics"):
        select_loss({"skewness": 0.0})


def _masks_with_sizes(sizes, shape=(10, 12)):
    voxels = math.prod(shape)
    masks = torch.zeros(len(sizes), voxels, dtype=torch.uint8)
    for i, size in enumerate(sizes):
        masks[i, torch.randperm(voxels)[:size]] = 1
    return masks.view(len(sizes), 1, *shape)


@pytest.mark.parametrize(
    "sizes, index",
    [
        ([110, 115, 118, 119, 120, 117, 116, 40, 112, 119, 5, 118], 1),  # S = -1.92: Fisher
        ([30, 35, 40, 45, 50, 55, 60, 65, 70, 75], 2),  # S = 0: BCE-Dice
        ([1, 1, 1, 1, 2, 2, 3, 4, 6, 8, 12, 20], 3),  # S = 1.62, K = 1.64: arcsine + Dice
        ([2, 3, 4, 3, 2, 5, 3, 4, 90, 2, 3, 4, 3, 2, 110, 3], 4),  # S = 2.32, K = 3.49: ln + Dice
    ],
)
def test_from_dataset_two_lines(sizes, index, caplog):
    masks = _masks_with_sizes(sizes + [0, 0])  # empty masks are filtered before the statistics
    loader = DataLoader(TensorDataset(torch.randn(len(masks), 1, 10, 12), masks), batch_size=5)

    with caplog.at_level(logging.INFO, logger="lmfloss_kernels.calf.selection"):
        criterion = CALFLoss.from_dataset(loader, progress=False)
    assert "CALF selection" in caplog.text

    stats = criterion.selection.statistics
    assert stats.count == len(sizes)
    assert stats.skewness == pytest.approx(scipy.stats.skew(np.array(sizes, float), bias=True), rel=1e-10)
    assert stats.kurtosis == pytest.approx(scipy.stats.kurtosis(np.array(sizes, float), bias=True), rel=1e-10)
    expected = select_loss(stats)
    assert criterion.selection == expected and expected.index == index
    assert criterion.transform == expected.transform and criterion.options["dice_coef"] == expected.dice_coef

    logits = torch.randn(3, 1, 10, 12)
    value = criterion(logits, masks[:3])
    direct = transform_loss(logits, masks[:3], expected.transform, dice_coef=expected.dice_coef)
    torch.testing.assert_close(value, direct)


def test_from_dataset_branches_and_options():
    left = _masks_with_sizes([110, 115, 118, 119, 120, 117, 116, 40, 112, 119, 5, 118])
    criterion = CALFLoss.from_dataset(list(left), progress=False, reduction="sum", ignore_index=255)
    assert criterion.selection.index == 1 and criterion.transform == "fisher"
    assert criterion.options["reduction"] == "sum" and criterion.options["ignore_index"] == 255
    assert "transform='fisher'" in repr(criterion)

    custom = CALFLoss.from_dataset(list(left), progress=False, rules=[("otherwise", "arcsine", 0.25)])
    assert (custom.transform, custom.options["dice_coef"]) == ("arcsine", 0.25)
    with pytest.raises(TypeError, match="chosen by the rule table"):
        CALFLoss.from_dataset(list(left), progress=False, transform="ln")

    plain = CALFLoss("logit", dice_coef=1.0)
    assert plain.selection is None
    logits, target = torch.randn(2, 1, 6, 6, requires_grad=True), torch.randint(0, 2, (2, 6, 6))
    plain(logits, target).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match="backend must be one of .*'triton' is its CUDA path"):
        CALFLoss(backend="cuda")


@pytest.mark.skipif(ext.LOAD_ERROR is not None, reason=f"C++ extension not loaded: {ext.LOAD_ERROR}")
def test_criterion_on_the_cpu_backend():
    """The chosen loss is an ordinary criterion on the fused CPU backend ("auto" picks it for CPU tensors)."""
    criterion = CALFLoss("arcsine", dice_coef=1.0, backend="cpu")
    assert "backend='cpu'" in repr(criterion)
    logits, target = torch.randn(2, 1, 9, 7), torch.randint(0, 2, (2, 9, 7))
    results = []
    for module in (
        criterion,
        CALFLoss("arcsine", dice_coef=1.0, backend="auto"),
        CALFLoss("arcsine", dice_coef=1.0, backend="reference"),
    ):
        x = logits.clone().requires_grad_(True)
        value = module(x, target)
        value.backward()
        results.append((value.detach(), x.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    torch.testing.assert_close(results[0][0], results[2][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(results[0][1], results[2][1], rtol=1e-5, atol=1e-8)
