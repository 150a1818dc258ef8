r"""CALF loss selection: a rule table from dataset statistics to a transformation loss.

Two lines build a criterion from a data set of label maps::

    criterion = CALFLoss.from_dataset(train_loader)  # one pass over the masks: S, K, rule, loss
    print(criterion.selection)                       # the statistics, the branch taken and why

then ``loss = criterion(logits, mask)`` with single-channel logits, on the fused backends.

The rule table (:data:`DEFAULT_RULES`) is evaluated top to bottom on the skewness ``S`` and excess
kurtosis ``K`` of the per-image foreground sizes (:mod:`lmfloss_kernels.calf.stats`); the first
row whose condition holds picks the loss:

=========================  ==========================  =======
condition                  loss                        source
=========================  ==========================  =======
``S <= -1``                Fisher                      paper
``-1 < S < 1``             BCE + Dice (no transform)   ours
``S >= 1 and K < 3``       Arcsine + Dice              ours
``S >= 1 and K >= 3``      Natural log (BCE) + Dice    ours
``otherwise``              BCE + Dice                  ours
=========================  ==========================  =======

Only the first row is stated by the CALF paper (Alam et al., arXiv 2504.04458), together with the
candidate set and the use of ``S`` and ``K``; the other thresholds and branches are our
interpretation (``losses.md`` 4.2) and are meant to be replaced when the authors' table is known.
The last row catches undefined statistics (NaN: fewer than two images or all sizes equal).

Override the table with your own rows, e.g.
``rules=[("S <= -1", "fisher"), ("K >= 3", "log10", 1.0), ("otherwise", "ln", 1.0)]``:
a condition is ``otherwise`` or an expression in ``S``, ``K``, numbers, comparisons (chains
allowed), ``and``, ``or``, ``not`` and parentheses (parsed, never passed to ``eval``).
"""

from __future__ import annotations

import ast
import logging
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .stats import MIN_IMAGES, ForegroundSizeAccumulator, ImbalanceStatistics
from .transforms import check_backend, check_loss_options, check_transform, transform_loss

__all__ = ["DEFAULT_RULES", "CALFLoss", "Selection", "SelectionRule", "select_loss"]

_log = logging.getLogger(__name__)

_COMPARE = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}


def _evaluate(node: ast.AST, values: dict[str, float]) -> float | bool:
    """Value of a parsed condition; raises ValueError on anything but the documented grammar."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, values)
    if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.And | ast.Or):
        results = [bool(_evaluate(v, values)) for v in node.values]
        return all(results) if isinstance(node.op, ast.And) else any(results)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return not _evaluate(node.operand, values)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        operand = float(_evaluate(node.operand, values))
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
        left = float(_evaluate(node.left, values))
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = float(_evaluate(right_node, values))
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Name) and node.id in values:
        return values[node.id]
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return float(node.value)
    raise ValueError(f"unsupported element {ast.dump(node)}")


def _parse_condition(condition: str) -> ast.Expression | None:
    """The parsed condition (None for ``otherwise``), checked once on dummy values."""
    if not isinstance(condition, str):
        raise TypeError(f"a rule condition must be a string, got {type(condition).__name__}: {condition!r}")
    if condition.strip() == "otherwise":
        return None
    try:
        tree = ast.parse(condition.strip(), mode="eval")
        _evaluate(tree, {"S": 0.0, "K": 0.0})
    except (SyntaxError, ValueError) as error:
        raise ValueError(
            f"rule condition {condition!r} is not 'otherwise' or an expression in S, K, numbers, "
            f"comparisons, and/or/not ({error})"
        ) from None
    return tree


@dataclass(frozen=True)
class SelectionRule:
    """One row of the selection table: if ``condition`` holds, use ``transform`` (+ ``dice_coef`` · Dice)."""

    condition: str
    transform: str
    dice_coef: float = 0.0
    source: str = "ours"
    note: str = ""
    _tree: ast.Expression | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_tree", _parse_condition(self.condition))
        check_transform(self.transform)
        check_loss_options(
            transform=self.transform,
            transform_coef=1.0,
            dice_coef=self.dice_coef,
            eps=1e-7,
            smooth_nr=0.0,
            smooth_dr=1.0,
            batch=False,
            ignore_index=None,
            reduction="mean",
        )

    def matches(self, statistics: ImbalanceStatistics) -> bool:
        if self._tree is None:
            return True
        return bool(_evaluate(self._tree, {"S": statistics.skewness, "K": statistics.kurtosis}))

    def describe(self) -> str:
        loss = {"ln": "natural log (BCE)", "log10": "log10", "fisher": "Fisher", "logit": "logit"}.get(
            self.transform, self.transform
        )
        return f"{loss}" + (f" + {self.dice_coef:g} x Dice" if self.dice_coef else "")


DEFAULT_RULES: tuple[SelectionRule, ...] = (
    SelectionRule("S <= -1", "fisher", 0.0, "paper", "the one rule the CALF paper states"),
    SelectionRule("-1 < S < 1", "ln", 1.0, "ours", "near-symmetric sizes: BCE-Dice, no transform"),
    SelectionRule("S >= 1 and K < 3", "arcsine", 1.0, "ours", "right-skewed, light tails: bounded arcsine"),
    SelectionRule("S >= 1 and K >= 3", "ln", 1.0, "ours", "right-skewed, heavy tails: log (log10 = same up to scale)"),
    SelectionRule("otherwise", "ln", 1.0, "ours", "S or K undefined (too few images or equal sizes)"),
)


@dataclass(frozen=True)
class Selection:
    """The outcome of :func:`select_loss`: the statistics, the row taken (1-based ``index``) and why."""

    statistics: ImbalanceStatistics
    rule: SelectionRule
    index: int

    @property
    def transform(self) -> str:
        return self.rule.transform

    @property
    def dice_coef(self) -> float:
        return self.rule.dice_coef

    @property
    def reason(self) -> str:
        stats, rule = self.statistics, self.rule
        values = f"S = {stats.skewness:.4g}, K = {stats.kurtosis:.4g}"
        source = "from the CALF paper" if rule.source == "paper" else "our interpretation, not the paper's"
        note = f"; {rule.note}" if rule.note else ""
        return f"{values} satisfies rule {self.index} '{rule.condition}' ({source}{note}) -> {rule.describe()}"

    def __str__(self) -> str:
        return f"CALF selection: {self.statistics}\n  {self.reason}"


def _as_rule(row: object) -> SelectionRule:
    if isinstance(row, SelectionRule):
        return row
    if isinstance(row, Sequence) and not isinstance(row, str) and 2 <= len(row) <= 3:
        return SelectionRule(*row)
    raise TypeError(f"a rule must be a SelectionRule or a (condition, transform[, dice_coef]) tuple, got {row!r}")


def select_loss(statistics: ImbalanceStatistics, rules: Iterable = DEFAULT_RULES) -> Selection:
    """The first row of ``rules`` whose condition holds for ``statistics`` (see the module table)."""
    if not isinstance(statistics, ImbalanceStatistics):
        raise TypeError(f"statistics must be an ImbalanceStatistics, got {type(statistics).__name__}")
    table = [_as_rule(row) for row in rules]
    if not table:
        raise ValueError("rules must hold at least one row")
    for index, rule in enumerate(table, start=1):
        if rule.matches(statistics):
            return Selection(statistics, rule, index)
    raise ValueError(
        f"no rule matches S = {statistics.skewness:.4g}, K = {statistics.kurtosis:.4g} "
        f"(conditions {[r.condition for r in table]}); end the table with an 'otherwise' row"
    )


class CALFLoss(nn.Module):
    """CALF criterion: the transformation loss of :func:`~lmfloss_kernels.calf.transform_loss` as a module.

    Build it from data with :meth:`from_dataset` (or :meth:`from_statistics`); ``selection`` then
    records the statistics and the rule that chose ``transform`` and ``dice_coef``. Built directly,
    it is an ordinary criterion with ``selection = None``. Keywords as in
    :func:`~lmfloss_kernels.calf.transform_loss`, checked here; ``backend`` is ``"auto"`` (the
    fused C++ kernels for CPU tensors, Triton for CUDA tensors), ``"cpu"``, ``"triton"`` or
    ``"reference"``.
    """

    def __init__(
        self,
        transform: str = "ln",
        *,
        transform_coef: float = 1.0,
        dice_coef: float = 0.0,
        eps: float = 1e-7,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        ignore_index: int | None = None,
        reduction: str = "mean",
        backend: str = "auto",
        selection: Selection | None = None,
    ) -> None:
        super().__init__()
        self.options = check_loss_options(
            transform=transform,
            transform_coef=transform_coef,
            dice_coef=dice_coef,
            eps=eps,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
            ignore_index=ignore_index,
            reduction=reduction,
        )
        self.backend = check_backend(backend)
        self.selection = selection

    @property
    def transform(self) -> str:
        return self.options["transform"]

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        options = dict(self.options)
        return transform_loss(logits, target, options.pop("transform"), **options, backend=self.backend)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in {**self.options, "backend": self.backend}.items())

    @classmethod
    def from_statistics(cls, statistics: ImbalanceStatistics, *, rules: Iterable = DEFAULT_RULES, **kwargs) -> CALFLoss:
        """The criterion that ``rules`` choose for these statistics; other keywords as in the constructor."""
        for chosen in ("transform", "dice_coef", "selection"):
            if chosen in kwargs:
                raise TypeError(f"{chosen} is chosen by the rule table; pass rules=... to change it")
        selection = select_loss(statistics, rules)
        _log.info("%s", selection)
        return cls(selection.transform, dice_coef=selection.dice_coef, selection=selection, **kwargs)

    @classmethod
    def from_dataset(
        cls,
        data: Iterable,
        *,
        num_classes: int = 2,
        foreground: Sequence[int] | None = None,
        label_key: object = None,
        batched: bool | None = None,
        progress: bool = True,
        drop_empty: bool = True,
        min_count: int = MIN_IMAGES,
        rules: Iterable = DEFAULT_RULES,
        **kwargs,
    ) -> CALFLoss:
        """One pass over ``data`` (a ``DataLoader``, a dataset or an iterable of items with label maps)
        for the foreground sizes (:meth:`ForegroundSizeAccumulator.from_loader`, same keywords), then
        their statistics, the rule and the criterion. ``ignore_index`` (a loss keyword) also keeps
        those voxels out of the sizes. The statistics and the reason are in ``criterion.selection``
        (and logged at INFO level). Under ``torch.distributed`` every rank must call it (each on
        its shard): the sizes are gathered, so all ranks choose the same loss. Only the label maps
        are used; a loader that skips loading the images makes the pass much cheaper.
        """
        accumulator = ForegroundSizeAccumulator.from_loader(
            data,
            num_classes,
            label_key=label_key,
            batched=batched,
            progress=progress,
            foreground=foreground,
            ignore_index=kwargs.get("ignore_index"),
            drop_empty=drop_empty,
        )
        return cls.from_statistics(accumulator.statistics(min_count=min_count), rules=rules, **kwargs)
