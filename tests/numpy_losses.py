r"""Independent numpy float64 transcriptions of every loss, in the authors' own style.

These are the ground truth the tests hold :mod:`lmfloss_kernels` to. They are written from
``losses.md`` and the authors' code as quoted there, one function per named loss, in the shape
the authors wrote them: channels-last one-hot arrays and explicit per-class terms for the Keras
segmentation losses (mlyg/unified-focal-loss), per-row loops for LDAM (kaidic/LDAM-DRW), the
AdeelH focal loss and the LMF combination (Adnan-Sadi/LMFLOSS). They share nothing with
``lmfloss_kernels.reference`` (which folds every loss into two generic families), so agreement
between the two is evidence that the families and the keyword mapping are right.

Conventions
-----------
* Segmentation functions take ``y_true`` (one-hot, channels last, ``(B, *S, C)``) and
  ``y_pred`` (softmax probabilities, same shape), exactly the Keras signature, and return the
  Keras value (a batch mean). Per-image values ("none") come from calling them on one image.
* ``clip=True`` is Keras' ``K.clip(y_pred, eps, 1 - eps)`` with TensorFlow's gradient: the
  clipped value is a constant outside the interval and the identity at and inside its ends.
  ``clip=False`` uses the probabilities as they are (the package's log-space variant; in
  float64 on moderate logits ``log(softmax)`` equals ``log_softmax`` to rounding).
* Every function works on complex arrays too (comparisons look at the real part, nothing is
  conjugated), so :func:`complex_step_grad` gives their logit gradients to rounding error,
  independently of any autograd.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

KERAS_EPSILON = 1e-7  # K.epsilon()


# --------------------------------------------------------------------------------------------
# Building blocks


def softmax(z: np.ndarray, axis: int) -> np.ndarray:
    """Max-shifted softmax; the shift uses the real part so complex-step perturbations pass through."""
    shifted = z - z.real.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(z: np.ndarray, axis: int) -> np.ndarray:
    shifted = z - z.real.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def keras_clip(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """``tf.clip_by_value``: the bound (a constant) strictly outside, ``x`` itself at and inside the ends."""
    return np.where(x.real < low, low, np.where(x.real > high, high, x))


def channels_last(logits: np.ndarray) -> np.ndarray:
    """``(B, C, *S)`` -> ``(B, *S, C)``, the Keras layout."""
    return np.moveaxis(logits, 1, -1)


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Integer labels ``(B, *S)`` -> float one-hot ``(B, *S, C)``."""
    return np.eye(num_classes)[labels]


def identify_axis(y: np.ndarray) -> tuple[int, ...]:
    """Spatial axes of a channels-last tensor (the authors' ``identify_axis``, any rank)."""
    return tuple(range(1, y.ndim - 1))


def _prepare(y_pred: np.ndarray, clip: bool, eps: float) -> np.ndarray:
    return keras_clip(y_pred, eps, 1.0 - eps) if clip else y_pred


def _tp_fn_fp(y_true, y_pred):
    axis = identify_axis(y_true)
    tp = np.sum(y_true * y_pred, axis=axis)
    fn = np.sum(y_true * (1 - y_pred), axis=axis)
    fp = np.sum((1 - y_true) * y_pred, axis=axis)
    return tp, fn, fp


def tversky_index(y_true, y_pred, delta: float, smooth: float) -> np.ndarray:
    """``(TP + smooth) / (TP + delta FN + (1 - delta) FP + smooth)`` per image and class, ``(B, C)``."""
    tp, fn, fp = _tp_fn_fp(y_true, y_pred)
    return (tp + smooth) / (tp + delta * fn + (1 - delta) * fp + smooth)


# --------------------------------------------------------------------------------------------
# Unified Focal loss family (mlyg/unified-focal-loss @ 411c9c5, multi-class as losses.md 2.4)


def symmetric_focal_loss(y_true, y_pred, delta=0.7, gamma=2.0, *, clip=True, eps=KERAS_EPSILON):
    y_pred = _prepare(y_pred, clip, eps)
    cross_entropy = -y_true * np.log(y_pred)
    back_ce = (1 - delta) * np.power(1 - y_pred[..., 0], gamma) * cross_entropy[..., 0]
    terms = [back_ce]
    for c in range(1, y_true.shape[-1]):
        terms.append(delta * np.power(1 - y_pred[..., c], gamma) * cross_entropy[..., c])
    return np.mean(np.sum(np.stack(terms, axis=-1), axis=-1))


def asymmetric_focal_loss(y_true, y_pred, delta=0.7, gamma=2.0, *, clip=True, eps=KERAS_EPSILON):
    y_pred = _prepare(y_pred, clip, eps)
    cross_entropy = -y_true * np.log(y_pred)
    back_ce = (1 - delta) * np.power(1 - y_pred[..., 0], gamma) * cross_entropy[..., 0]
    terms = [back_ce]
    for c in range(1, y_true.shape[-1]):
        terms.append(delta * cross_entropy[..., c])
    return np.mean(np.sum(np.stack(terms, axis=-1), axis=-1))


def symmetric_focal_tversky_loss(y_true, y_pred, delta=0.7, gamma=0.75, *, clip=True, eps=KERAS_EPSILON):
    y_pred = _prepare(y_pred, clip, eps)
    dice_class = tversky_index(y_true, y_pred, delta, eps)
    per_class = [(1 - dice_class[:, c]) * np.power(1 - dice_class[:, c], -gamma) for c in range(y_true.shape[-1])]
    return np.mean(np.stack(per_class, axis=-1))


def asymmetric_focal_tversky_loss(y_true, y_pred, delta=0.7, gamma=0.75, *, clip=True, eps=KERAS_EPSILON):
    y_pred = _prepare(y_pred, clip, eps)
    dice_class = tversky_index(y_true, y_pred, delta, eps)
    per_class = [1 - dice_class[:, 0]]
    for c in range(1, y_true.shape[-1]):
        per_class.append((1 - dice_class[:, c]) * np.power(1 - dice_class[:, c], -gamma))
    return np.mean(np.stack(per_class, axis=-1))


def _unified(ftl, fl, weight):
    if weight is not None:
        return weight * ftl + (1 - weight) * fl
    return ftl + fl


def sym_unified_focal_loss(y_true, y_pred, weight=0.5, delta=0.6, gamma=0.5, *, clip=True, eps=KERAS_EPSILON):
    ftl = symmetric_focal_tversky_loss(y_true, y_pred, delta=delta, gamma=gamma, clip=clip, eps=eps)
    fl = symmetric_focal_loss(y_true, y_pred, delta=delta, gamma=gamma, clip=clip, eps=eps)
    return _unified(ftl, fl, weight)


def asym_unified_focal_loss(y_true, y_pred, weight=0.5, delta=0.6, gamma=0.5, *, clip=True, eps=KERAS_EPSILON):
    ftl = asymmetric_focal_tversky_loss(y_true, y_pred, delta=delta, gamma=gamma, clip=clip, eps=eps)
    fl = asymmetric_focal_loss(y_true, y_pred, delta=delta, gamma=gamma, clip=clip, eps=eps)
    return _unified(ftl, fl, weight)


def tversky_loss(y_true, y_pred, delta=0.7, smooth=1e-6, *, clip=False, eps=KERAS_EPSILON):
    """The authors' ``tversky_loss``: no clip unless asked, ``mean(1 - TI)`` over images and classes."""
    y_pred = _prepare(y_pred, clip, eps)
    return np.mean(1 - tversky_index(y_true, y_pred, delta, smooth))


def dice_loss(y_true, y_pred, smooth=1e-6, *, clip=False, eps=KERAS_EPSILON):
    """The authors' ``dice_loss(delta=0.5)``."""
    return tversky_loss(y_true, y_pred, delta=0.5, smooth=smooth, clip=clip, eps=eps)


# --------------------------------------------------------------------------------------------
# Mixed Focal loss (mlyg/unified-focal-loss loss-functions.py @ d3e6647)


def modified_focal_loss(y_true, y_pred, alpha=None, beta=None, gamma_f=2.0, *, clip=True, eps=KERAS_EPSILON):
    """``focal_loss(alpha, beta, gamma_f)`` of the Mixed Focal code; ``beta`` weighs ``[beta, 1 - beta, ...]``."""
    y_pred = _prepare(y_pred, clip, eps)
    cross_entropy = -y_true * np.log(y_pred)
    num_classes = y_true.shape[-1]
    if beta is not None:
        beta_weight = np.array([beta] + [1 - beta] * (num_classes - 1))
        cross_entropy = beta_weight * cross_entropy
    if alpha is not None:
        alpha_weight = np.array(alpha, dtype=np.float64)
        focal = alpha_weight * np.power(1 - y_pred, gamma_f) * cross_entropy
    else:
        focal = np.power(1 - y_pred, gamma_f) * cross_entropy
    return np.mean(np.sum(focal, axis=-1))


def focal_dice_loss(y_true, y_pred, delta=0.7, gamma_fd=0.75, smooth=1e-6, *, clip=True, eps=KERAS_EPSILON):
    """Per image ``sum_c (1 - dice_c)^gamma_fd / C``, averaged over the batch as Keras does."""
    y_pred = _prepare(y_pred, clip, eps)
    dice_class = tversky_index(y_true, y_pred, delta, smooth)
    per_sample = np.sum(np.power(1 - dice_class, gamma_fd), axis=-1) / y_true.shape[-1]
    return np.mean(per_sample)


def mixed_focal_loss(
    y_true,
    y_pred,
    weight=None,
    alpha=None,
    beta=None,
    delta=0.7,
    gamma_f=2.0,
    gamma_fd=0.75,
    smooth=1e-6,
    *,
    clip=True,
    eps=KERAS_EPSILON,
):
    focal_dice = focal_dice_loss(y_true, y_pred, delta=delta, gamma_fd=gamma_fd, smooth=smooth, clip=clip, eps=eps)
    focal = modified_focal_loss(y_true, y_pred, alpha=alpha, beta=beta, gamma_f=gamma_f, clip=clip, eps=eps)
    if weight is not None:
        return weight * focal_dice + (1 - weight) * focal
    return focal_dice + focal


# --------------------------------------------------------------------------------------------
# Ignored voxels and per-image values for the Keras losses


def keras_on_logits(
    loss: Callable,
    logits: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    soft_target: np.ndarray | None = None,
    ignore_index: int | None = None,
    reduction: str = "mean",
    **kwargs,
):
    """Apply a Keras-style loss to ``(B, C, *S)`` logits, one image at a time.

    Each image is evaluated on its own (its valid voxels gathered into one flat "image" when
    ``ignore_index`` is set, i.e. ignored voxels simply do not exist for the loss), giving the
    per-image values of ``"none"``; ``"mean"`` / ``"sum"`` combine them. Without ignored voxels
    the mean equals the Keras batch value.
    """
    num_classes = logits.shape[1]
    probs = softmax(channels_last(logits), axis=-1)
    if soft_target is not None:
        truth = channels_last(soft_target)
    else:
        known = labels if ignore_index is None else np.where(labels == ignore_index, 0, labels)
        truth = one_hot(known, num_classes)  # ignored voxels are dropped below whatever their row is
    per_image = []
    for b in range(logits.shape[0]):
        p_b, y_b = probs[b], truth[b]
        if ignore_index is not None:
            keep = labels[b] != ignore_index
            p_b, y_b = p_b[keep][None], y_b[keep][None]
        else:
            p_b, y_b = p_b[None], y_b[None]
        per_image.append(loss(y_b, p_b, **kwargs))
    per_image = np.stack(per_image)
    return _reduce(per_image, reduction)


def _reduce(values, reduction):
    if reduction == "none":
        return values
    if reduction == "sum":
        return np.sum(values)
    return np.mean(values)


def batch_tversky_on_logits(ftl: Callable, fl: Callable | None, logits, labels, *, weight, reduction="mean", **kw):
    """``batch=True``: the Tversky part sees the whole batch as one image; the focal part stays per image.

    ``ftl(y, p)`` is the region term (computed once on the concatenated batch), ``fl(y, p)`` the
    voxel term (per image), combined as ``weight * ftl + (1 - weight) * fl`` (sum if ``weight`` is
    None); returns per-image values for ``"none"``.
    """
    num_classes = logits.shape[1]
    probs = softmax(channels_last(logits), axis=-1)
    truth = one_hot(labels, num_classes)
    flat_p = probs.reshape(1, -1, num_classes)
    flat_y = truth.reshape(1, -1, num_classes)
    shared = ftl(flat_y, flat_p, **kw)
    per_image = []
    for b in range(logits.shape[0]):
        focal = fl(truth[b][None], probs[b][None], **kw) if fl is not None else 0.0
        per_image.append(_unified(shared, focal, weight))
    return _reduce(np.stack(per_image), reduction)


# --------------------------------------------------------------------------------------------
# Row losses: LDAM (kaidic/LDAM-DRW), AdeelH focal, LMF (Adnan-Sadi/LMFLOSS)


def get_mlist(cls_num_list, max_m=0.5):
    """Margins of ``utils.get_mlist`` / kaidic ``LDAMLoss``: ``1 / n^(1/4)`` scaled so the largest is ``max_m``."""
    m_list = 1.0 / np.sqrt(np.sqrt(np.asarray(cls_num_list, dtype=np.float64)))
    return m_list * (max_m / np.max(m_list))


def drw_per_cls_weights(cls_num_list, beta=0.9999):
    """kaidic ``cifar_train.py`` DRW weights: effective numbers, normalised to sum to the class count."""
    cls_num_list = np.asarray(cls_num_list, dtype=np.float64)
    effective_num = 1.0 - np.power(beta, cls_num_list)
    per_cls_weights = (1.0 - beta) / effective_num
    return per_cls_weights / np.sum(per_cls_weights) * len(cls_num_list)


def rows_of(logits: np.ndarray, labels: np.ndarray):
    """``(N, C)`` rows or every voxel of ``(B, C, *S)`` as rows (AdeelH's permute-and-reshape)."""
    if logits.ndim > 2:
        num_classes = logits.shape[1]
        logits = np.moveaxis(logits, 1, -1).reshape(-1, num_classes)
    return logits, labels.reshape(-1)


def ldam_rows(x, target, m_list, weight=None, s=30.0, ignore_index=-100):
    """Per-row weighted LDAM terms ``w_t * CE(s * (x - m_t e_t))`` and weights (0 for ignored rows)."""
    losses, weights = [], []
    for i in range(x.shape[0]):
        t = int(target[i])
        if t == ignore_index:
            losses.append(0.0)
            weights.append(0.0)
            continue
        output = x[i] + 0.0
        output[t] = output[t] - m_list[t]
        w = 1.0 if weight is None else weight[t]
        losses.append(-w * log_softmax(s * output, axis=0)[t])
        weights.append(w)
    return np.stack(losses), np.array(weights)


def ldam_loss(logits, labels, m_list, weight=None, s=30.0, ignore_index=-100, reduction="mean"):
    """kaidic ``LDAMLoss.forward``: ``F.cross_entropy(s * output, target, weight)`` (mean divides by sum of w)."""
    x, target = rows_of(logits, labels)
    losses, weights = ldam_rows(x, target, m_list, weight, s, ignore_index)
    if reduction == "mean":
        return np.sum(losses) / np.sum(weights)
    if reduction == "sum":
        return np.sum(losses)
    return losses.reshape(labels.shape)


def adeelh_focal_rows(x, target, alpha=None, gamma=0.0, ignore_index=-100):
    """AdeelH ``FocalLoss`` terms ``(1 - p_t)^gamma * alpha_t * (-log p_t)`` per row (0 for ignored rows)."""
    out = []
    for i in range(x.shape[0]):
        t = int(target[i])
        if t == ignore_index:
            out.append(0.0)
            continue
        log_p = log_softmax(x[i], axis=0)
        ce = -(1.0 if alpha is None else alpha[t]) * log_p[t]
        pt = np.exp(log_p[t])
        out.append(np.power(1 - pt, gamma) * ce)
    return np.stack(out)


def adeelh_focal_loss(logits, labels, alpha=None, gamma=0.0, ignore_index=-100, reduction="mean"):
    """AdeelH focal loss; ``"mean"`` averages over unignored rows, ``"none"`` keeps 0 at ignored rows."""
    x, target = rows_of(logits, labels)
    terms = adeelh_focal_rows(x, target, alpha, gamma, ignore_index)
    if reduction == "mean":
        return np.sum(terms) / np.count_nonzero(target != ignore_index)
    if reduction == "sum":
        return np.sum(terms)
    return terms.reshape(labels.shape)


def lmf_loss(
    logits,
    labels,
    cls_num_list,
    alpha=1.0,
    beta=1.0,
    gamma=1.5,
    s=30.0,
    max_m=0.5,
    weight="margins",
    ignore_index=-100,
    reduction="mean",
):
    """Adnan-Sadi ``LMFLoss``: ``alpha * LDAMLoss(m, weight=m) + beta * focal(alpha=m, gamma)``."""
    m_list = get_mlist(cls_num_list, max_m)
    w = m_list if isinstance(weight, str) else weight
    ldam = ldam_loss(logits, labels, m_list, w, s, ignore_index, reduction)
    focal = adeelh_focal_loss(logits, labels, w, gamma, ignore_index, reduction)
    return alpha * ldam + beta * focal


# --------------------------------------------------------------------------------------------
# Gradients


def complex_step_grad(f: Callable[[np.ndarray], complex], x: np.ndarray, h: float = 1e-30) -> np.ndarray:
    r"""``df/dx`` by the complex step ``Im f(x + i h e_k) / h``: no cancellation, exact to rounding.

    ``f`` must be real-analytic in ``x`` along the real axis and written without conjugation
    (all functions of this module are).
    """
    grad = np.zeros(x.shape)
    base = x.astype(np.complex128)
    flat = base.reshape(-1)
    for k in range(flat.size):
        flat[k] += 1j * h
        grad.reshape(-1)[k] = np.imag(f(base)) / h
        flat[k] -= 1j * h
    return grad


def central_difference_grad(f: Callable[[np.ndarray], float], x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """``(f(x + h e_k) - f(x - h e_k)) / 2h``: used only to cross-check :func:`complex_step_grad`."""
    grad = np.zeros(x.shape)
    for k in range(x.size):
        step = np.zeros(x.size)
        step[k] = h
        step = step.reshape(x.shape)
        grad.reshape(-1)[k] = (f(x + step) - f(x - step)) / (2 * h)
    return grad


def ldam_focal_closed_form_grad(logits, labels, m_list, weight, s, gamma, alpha, beta, ignore_index=-100):
    r"""losses.md 1.5: ``alpha (w_t/W) s (q - e_t) + beta (w_t/N) G(p_t) (p - e_t)`` for ``(N, C)`` rows."""
    n_rows, num_classes = logits.shape
    grad = np.zeros_like(logits)
    valid = labels != ignore_index
    big_w = sum(weight[t] for t in labels[valid])
    n_valid = np.count_nonzero(valid)
    for i in range(n_rows):
        t = int(labels[i])
        if t == ignore_index:
            continue
        e_t = np.eye(num_classes)[t]
        q = softmax(s * (logits[i] - m_list[t] * e_t), axis=0)
        p = softmax(logits[i], axis=0)
        pt = p[t]
        g = (1 - pt) ** gamma - gamma * pt * (1 - pt) ** (gamma - 1) * np.log(pt)
        grad[i] = alpha * weight[t] / big_w * s * (q - e_t) + beta * weight[t] / n_valid * g * (p - e_t)
    return grad


# --------------------------------------------------------------------------------------------
# MONAI conventions (losses.md 5.1-5.3), channels-first, to check the docstrings' comparisons


def monai_dice_loss(logits, labels, smooth_nr=1e-5, smooth_dr=1e-5):
    """``DiceLoss(softmax=True, to_onehot_y=True)``: ``1 - (2 TP + s_nr) / (sum P + sum Y + s_dr)``, mean over B x C."""
    probs = softmax(logits, axis=1)
    y = np.moveaxis(one_hot(labels, logits.shape[1]), -1, 1)
    axes = tuple(range(2, logits.ndim))
    intersection = np.sum(probs * y, axis=axes)
    return np.mean(1 - (2 * intersection + smooth_nr) / (np.sum(probs, axis=axes) + np.sum(y, axis=axes) + smooth_dr))


def monai_tversky_loss(logits, labels, alpha=0.5, beta=0.5, smooth_nr=1e-5, smooth_dr=1e-5):
    """``TverskyLoss(softmax=True, to_onehot_y=True)``: ``alpha`` weighs FP, ``beta`` FN."""
    probs = softmax(logits, axis=1)
    y = np.moveaxis(one_hot(labels, logits.shape[1]), -1, 1)
    axes = tuple(range(2, logits.ndim))
    tp = np.sum(probs * y, axis=axes)
    fp = alpha * np.sum(probs * (1 - y), axis=axes)
    fn = beta * np.sum((1 - probs) * y, axis=axes)
    return np.mean(1 - (tp + smooth_nr) / (tp + fp + fn + smooth_dr))


def monai_softmax_focal_loss(logits, labels, gamma=2.0):
    """``FocalLoss(use_softmax=True, to_onehot_y=True)``, ``"mean"``: the mean over all B x C x spatial elements."""
    log_p = log_softmax(logits, axis=1)
    y = np.moveaxis(one_hot(labels, logits.shape[1]), -1, 1)
    return np.mean(-np.power(1 - np.exp(log_p), gamma) * log_p * y)


# --------------------------------------------------------------------------------------------
# Sigmoid (multi-label) mode: every channel an independent binary problem, Keras-style
# (channels-last multi-hot ``y_true``, sigmoid probabilities ``y_pred``, batch-mean values)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Elementwise logistic function; complex-safe for the complex step."""
    return 1.0 / (1.0 + np.exp(-z))


def multilabel_focal_loss(y_true, y_pred, pos_weight, pos_gamma, neg_weight, neg_gamma, *, clip, eps=KERAS_EPSILON):
    """``mean_voxels sum_c [a+ y (1-q)^g+ (-log q) + a- (1-y) q^g- (-log(1-q))]``, per-channel or scalar constants."""
    q = _prepare(y_pred, clip, eps)
    positive = pos_weight * y_true * np.power(1 - q, pos_gamma) * -np.log(q)
    negative = neg_weight * (1 - y_true) * np.power(q, neg_gamma) * -np.log(1 - q)
    return np.mean(np.sum(positive + negative, axis=-1))


def multilabel_focal_tversky(y_true, y_pred, delta, exponent, smooth, *, clip, eps=KERAS_EPSILON):
    """``mean_{b,c} (1 - TI_bc)^exponent`` on the (clipped) sigmoid probabilities: every channel a foreground."""
    q = _prepare(y_pred, clip, eps)
    return np.mean(np.power(1 - tversky_index(y_true, q, delta, smooth), exponent))


def multilabel_unified_focal_loss(
    y_true, y_pred, weight=0.5, delta=0.6, gamma=0.5, asymmetric=True, *, clip=True, eps=KERAS_EPSILON
):
    """Unified Focal with the negative side as the background (``1 - delta``, ``gamma``) and the positive
    side as the foreground (``delta``, 0 or ``gamma``); every Tversky term enhanced by ``1 - gamma``."""
    focal = multilabel_focal_loss(
        y_true, y_pred, delta, 0.0 if asymmetric else gamma, 1 - delta, gamma, clip=clip, eps=eps
    )
    tversky = multilabel_focal_tversky(y_true, y_pred, delta, 1 - gamma, eps, clip=clip, eps=eps)
    return _unified(tversky, focal, weight)


def multilabel_mixed_focal_loss(
    y_true, y_pred, weight=None, alpha=None, beta=None, delta=0.7, gamma_f=2.0, gamma_fd=0.75, smooth=1e-6, *,
    clip=True, eps=KERAS_EPSILON,
):  # fmt: skip
    """Mixed Focal: positive side ``alpha_c (1 - beta)``, negative side ``alpha_c beta`` (1 where None)."""
    alpha = 1.0 if alpha is None else np.asarray(alpha, dtype=np.float64)
    background, foreground = (1.0, 1.0) if beta is None else (beta, 1 - beta)
    focal = multilabel_focal_loss(
        y_true, y_pred, alpha * foreground, gamma_f, alpha * background, gamma_f, clip=clip, eps=eps
    )
    focal_dice = multilabel_focal_tversky(y_true, y_pred, delta, gamma_fd, smooth, clip=clip, eps=eps)
    return _unified(focal_dice, focal, weight)


def soft_dice_per_class(y_true, y_pred, smooth):
    """MONAI / nnU-Net soft Dice loss per image and class: ``1 - (2 TP + s) / (sum y + sum p + s)``, ``(B, C)``."""
    axis = identify_axis(y_true)
    intersection = np.sum(y_true * y_pred, axis=axis)
    return 1 - (2 * intersection + smooth) / (np.sum(y_true, axis=axis) + np.sum(y_pred, axis=axis) + smooth)


def _kept_dice(y_true, y_pred, smooth, include_background):
    dice = soft_dice_per_class(y_true, y_pred, smooth)
    return np.mean(dice if include_background else dice[:, 1:])


def dice_ce_loss(
    y_true, y_pred, *, sigmoid, lambda_dice=1.0, lambda_ce=1.0, smooth=1e-5, include_background=True, weight=None,
    pos_weight=None,
):  # fmt: skip
    """``lambda_dice * Dice + lambda_ce * CE``: CE of softmax (sum over classes, mean over voxels) or the
    mean BCE over every element (``weight`` on both sides, ``pos_weight`` on the positive side)."""
    w = 1.0 if weight is None else np.asarray(weight, dtype=np.float64)
    if sigmoid:
        u = 1.0 if pos_weight is None else np.asarray(pos_weight, dtype=np.float64)
        ce = np.mean(w * -(u * y_true * np.log(y_pred) + (1 - y_true) * np.log(1 - y_pred)))
    else:
        ce = np.mean(np.sum(w * -y_true * np.log(y_pred), axis=-1))
    return lambda_dice * _kept_dice(y_true, y_pred, smooth, include_background) + lambda_ce * ce


def torchvision_sigmoid_focal_loss(y_true, y_pred, alpha=0.25, gamma=2.0):
    """torchvision.ops.sigmoid_focal_loss, ``"mean"``: ``alpha_t (1 - p_t)^gamma BCE`` averaged over every element."""
    ce = -(y_true * np.log(y_pred) + (1 - y_true) * np.log(1 - y_pred))
    p_t = y_pred * y_true + (1 - y_pred) * (1 - y_true)
    loss = ce * np.power(1 - p_t, gamma)
    if alpha is not None:
        loss = (alpha * y_true + (1 - alpha) * (1 - y_true)) * loss
    return np.mean(loss)


def dice_focal_loss(
    y_true, y_pred, *, sigmoid, gamma=2.0, alpha=None, lambda_dice=1.0, lambda_focal=1.0, smooth=1e-5,
    include_background=True,
):  # fmt: skip
    """``lambda_dice * Dice + lambda_focal * focal``: softmax focal (per-class alpha, sum over classes, mean
    over voxels) or torchvision's sigmoid focal loss (scalar alpha, mean over every element)."""
    if sigmoid:
        focal = torchvision_sigmoid_focal_loss(y_true, y_pred, alpha=alpha, gamma=gamma)
    else:
        a = 1.0 if alpha is None else np.asarray(alpha, dtype=np.float64)
        focal = np.mean(np.sum(a * np.power(1 - y_pred, gamma) * -y_true * np.log(y_pred), axis=-1))
    return lambda_dice * _kept_dice(y_true, y_pred, smooth, include_background) + lambda_focal * focal


def probabilities_on_logits(
    loss: Callable,
    logits: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    use_sigmoid: bool,
    dense_target: np.ndarray | None = None,
    ignore_index: int | None = None,
    reduction: str = "mean",
    **kwargs,
):
    """:func:`keras_on_logits` for either activation: a Keras-style ``loss(y_true, y_pred)`` per image.

    ``dense_target``: a channels-first multi-hot / soft map; else ``labels`` (read as one-hot, voxels
    equal to ``ignore_index`` gathered out of their image).
    """
    num_classes = logits.shape[1]
    probs = sigmoid(channels_last(logits)) if use_sigmoid else softmax(channels_last(logits), axis=-1)
    if dense_target is not None:
        truth = channels_last(dense_target).astype(np.float64)
    else:
        known = labels if ignore_index is None else np.where(labels == ignore_index, 0, labels)
        truth = one_hot(known, num_classes)
    per_image = []
    for b in range(logits.shape[0]):
        p_b, y_b = probs[b], truth[b]
        if dense_target is None and ignore_index is not None:
            keep = labels[b] != ignore_index
            p_b, y_b = p_b[keep], y_b[keep]
        per_image.append(loss(y_b[None], p_b[None], **kwargs))
    return _reduce(np.stack(per_image), reduction)
