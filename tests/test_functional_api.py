"""The public functional API: names and keywords, backend selection, check mode, dtypes, options.

Backend-registry tests replace ``lmfloss_kernels._backends._loaded`` with fake backends through
``monkeypatch``, so they do not depend on which fused backends happen to be built.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import lmfloss_kernels
from lmfloss_kernels import _backends, reference
from lmfloss_kernels import functional as F


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------
# Names and keywords (issue 2, item 3)

REQUIRED_SIGNATURES = {
    "lmf_loss": (
        ["logits", "target", "class_counts"],
        {
            "alpha": 1.0,
            "beta": 1.0,
            "gamma": 1.5,
            "s": 30.0,
            "max_m": 0.5,
            "weight": "margins",
            "reduction": "mean",
            "ignore_index": -100,
            "backend": "auto",
        },
    ),
    "unified_focal_loss": (
        ["logits", "target"],
        {
            "weight": 0.5,
            "delta": 0.6,
            "gamma": 0.5,
            "asymmetric": True,
            "batch": False,
            "clip": True,
            "eps": 1e-7,
            "reduction": "mean",
            "ignore_index": None,
            "backend": "auto",
        },
    ),
    "mixed_focal_loss": (
        ["logits", "target"],
        {
            "weight": None,
            "alpha": None,
            "beta": None,
            "delta": 0.7,
            "gamma_f": 2.0,
            "gamma_fd": 0.75,
            "clip": True,
            "eps": 1e-7,
            "smooth": 1e-6,
            "reduction": "mean",
            "ignore_index": None,
            "backend": "auto",
        },
    ),
}


@pytest.mark.parametrize("name", list(REQUIRED_SIGNATURES))
def test_required_signatures(name):
    positional, keywords = REQUIRED_SIGNATURES[name]
    params = inspect.signature(getattr(F, name)).parameters
    kinds = {p.name: p.kind for p in params.values()}
    assert [n for n, k in kinds.items() if k == inspect.Parameter.POSITIONAL_OR_KEYWORD] == positional
    keyword_only = {n: params[n].default for n, k in kinds.items() if k == inspect.Parameter.KEYWORD_ONLY}
    for key, default in keywords.items():
        assert key in keyword_only, key
        assert keyword_only[key] == default, (key, keyword_only[key], default)


@pytest.mark.parametrize(
    "name", ["ldam_loss", "focal_loss", "focal_tversky_loss", "tversky_loss", "dice_loss", "symmetric_focal_loss"]
)
def test_other_losses_exist_with_backend_keyword(name):
    params = inspect.signature(getattr(F, name)).parameters
    assert params["backend"].default == "auto"
    assert params["reduction"].default == "mean"
    assert len(inspect.getdoc(getattr(F, name))) > 200


@pytest.mark.parametrize(
    "name, monai_says",
    [
        ("unified_focal_loss", "MONAI ``AsymmetricUnifiedFocalLoss``"),
        ("focal_tversky_loss", "MONAI ``AsymmetricFocalTverskyLoss``"),
        ("asymmetric_focal_loss", "MONAI ``AsymmetricFocalLoss``"),
        ("symmetric_focal_loss", "MONAI has no symmetric focal loss"),
        ("focal_loss", "MONAI ``FocalLoss(use_softmax=True)``"),
        ("mixed_focal_loss", "MONAI has no Mixed Focal loss"),
        ("tversky_loss", "MONAI ``TverskyLoss``"),
        ("dice_loss", "MONAI ``DiceLoss(softmax=True)``"),
        ("lmf_loss", "MONAI has no LMF or LDAM loss"),
    ],
)
def test_docstrings_say_how_they_differ_from_monai(name, monai_says):
    assert monai_says in " ".join(inspect.getdoc(getattr(F, name)).split())


MODULE_FUNCTIONS = [
    ("LMFLoss", "lmf_loss"),
    ("LDAMLoss", "ldam_loss"),
    ("FocalLoss", "focal_loss"),
    ("UnifiedFocalLoss", "unified_focal_loss"),
    ("FocalTverskyLoss", "focal_tversky_loss"),
    ("SymmetricFocalLoss", "symmetric_focal_loss"),
    ("AsymmetricFocalLoss", "asymmetric_focal_loss"),
    ("MixedFocalLoss", "mixed_focal_loss"),
    ("TverskyLoss", "tversky_loss"),
    ("DiceLoss", "dice_loss"),
    ("DiceCELoss", "dice_ce_loss"),
    ("DiceFocalLoss", "dice_focal_loss"),
    ("SigmoidFocalLoss", "sigmoid_focal_loss"),
]


def test_every_module_has_its_function():
    assert sorted(module for module, _ in MODULE_FUNCTIONS) == sorted(lmfloss_kernels.modules.__all__)


@pytest.mark.parametrize("module, function", MODULE_FUNCTIONS)
def test_module_docstrings_carry_the_functions_formula_and_defaults(module, function):
    doc = inspect.getdoc(getattr(lmfloss_kernels, module))
    function = getattr(F, function)
    assert "Module form" not in doc.splitlines()[0]
    assert inspect.cleandoc(function.__doc__) in doc
    assert f"``{function.__name__}(logits, target, **keywords)``" in doc


@pytest.mark.parametrize("module, function", MODULE_FUNCTIONS)
def test_modules_take_the_functions_keywords(module, function):
    cls = getattr(lmfloss_kernels, module)
    assert issubclass(cls, torch.nn.Module)
    init = inspect.signature(cls.__init__).parameters
    fn = inspect.signature(getattr(F, function)).parameters
    expected = {n: p.default for n, p in fn.items() if n not in ("logits", "target")}
    got = {n: p.default for n, p in init.items() if n != "self"}
    assert got == expected


# ----------------------------------------------------------------------------------------------
# Backend selection


class FakeBackend:
    """A fused-backend stand-in: the reference, optionally scaled or with a wrong gradient."""

    def __init__(self, name, *, reason=None, scale=1.0, gradient_error=0.0):
        self.name = name
        self.reason = reason
        self.scale = scale
        self.gradient_error = gradient_error
        self.calls = 0

    def unavailable_reason(self, device, dtype):
        return self.reason

    def _wrap(self, value, logits):
        self.calls += 1
        # Same value, different gradient when gradient_error != 0.
        return value * self.scale + self.gradient_error * (logits - logits.detach()).sum()

    def row_loss(self, logits, *args, **kwargs):
        return self._wrap(reference.row_loss(logits, *args, **kwargs), logits)

    def region_loss(self, logits, *args, **kwargs):
        return self._wrap(reference.region_loss(logits, *args, **kwargs), logits)


@pytest.fixture
def registry(monkeypatch):
    """A registry with no fused backend built; tests put fakes into it."""
    loaded = {
        "reference": _backends.ReferenceBackend(),
        "cpu": "it could not be imported (not built in this test)",
        "cuda": "it could not be imported (not built in this test)",
        "triton": "it could not be imported (not built in this test)",
    }
    monkeypatch.setattr(_backends, "_loaded", loaded)
    monkeypatch.setattr(_backends, "_warned", set())
    return loaded


def _region_call(backend, **kwargs):
    logits = torch.randn(2, 3, 4, 5, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 5))
    return F.unified_focal_loss(logits, target, backend=backend, **kwargs)


def _row_call(backend, **kwargs):
    logits = torch.randn(9, 3, requires_grad=True)
    target = torch.randint(0, 3, (9,))
    return F.lmf_loss(logits, target, [5, 3, 1], backend=backend, **kwargs)


def test_auto_falls_back_to_the_reference_with_one_warning(registry):
    with pytest.warns(RuntimeWarning, match="no fused backend.*not built in this test.*reference"):
        first = _region_call("auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = _region_call("auto")
        _row_call("auto")
    assert first.requires_grad and second.requires_grad
    assert _backends.resolve_backend("auto", torch.zeros(1, 2)).name == "reference"


def test_fallback_warning_points_at_the_callers_line(registry):
    for call in (
        lambda: _region_call("auto"),
        lambda: lmfloss_kernels.LMFLoss([2, 1])(torch.randn(3, 2), torch.ones(3).long()),
    ):
        _backends._warned.clear()
        with pytest.warns(RuntimeWarning) as record:
            call()
        assert record[0].filename == __file__


def test_auto_picks_an_available_fused_backend(registry):
    fake = FakeBackend("cpu")
    registry["cpu"] = fake
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _region_call("auto")
        _row_call("auto")
    assert fake.calls == 2
    assert "cpu" in lmfloss_kernels.available_backends("cpu")


def test_auto_skips_a_backend_that_cannot_serve_the_dtype(registry):
    fake = FakeBackend("cpu", reason="float64 is not compiled in")
    registry["cpu"] = fake
    with pytest.warns(RuntimeWarning, match="float64 is not compiled in"):
        logits = torch.randn(2, 3, 4, dtype=torch.float64)
        F.dice_loss(logits, torch.randint(0, 3, (2, 4)))
    assert fake.calls == 0


@pytest.mark.parametrize("bad", ["fast", "Reference", "", None, 3])
def test_unknown_backend_is_a_value_error_listing_the_names(bad):
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'reference'"):
        _region_call(bad)
    with pytest.raises(ValueError, match="backend must be one of"):
        _row_call(bad)


def test_unavailable_backend_is_a_value_error_listing_what_is_available(registry):
    with pytest.raises(
        ValueError, match=r"backend 'cpu' cannot serve.*not built in this test.*\['auto', 'reference'\]"
    ):
        _region_call("cpu")
    registry["cpu"] = FakeBackend("cpu")
    assert _region_call("cpu").requires_grad


def test_check_mode_catches_a_wrong_value(registry):
    registry["cpu"] = FakeBackend("cpu", scale=1.01)
    _region_call("cpu")  # no check: the wrong value passes silently
    with lmfloss_kernels.options(check_backend=True):
        with pytest.raises(lmfloss_kernels.BackendMismatchError, match="'cpu' disagrees with the reference on region"):
            _region_call("cpu")
        with pytest.raises(lmfloss_kernels.BackendMismatchError, match="row_loss"):
            _row_call("cpu")
    assert not lmfloss_kernels.get_options().check_backend


def test_check_mode_catches_a_wrong_gradient(registry):
    registry["cpu"] = FakeBackend("cpu", gradient_error=1e-2)
    with lmfloss_kernels.options(check_backend=True):
        with pytest.raises(lmfloss_kernels.BackendMismatchError, match="gradient error"):
            _region_call("cpu", reduction="none")


def test_check_mode_passes_a_correct_backend(registry):
    fake = FakeBackend("cpu")
    registry["cpu"] = fake
    with lmfloss_kernels.options(check_backend=True):
        for reduction in ("mean", "sum", "none"):
            _region_call("cpu", reduction=reduction).sum().backward()
            _row_call("cpu", reduction=reduction).sum().backward()
    assert fake.calls == 12  # each call ran the backend twice: once checked, once for real


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_check_mode_works_without_autograd(registry, mode):
    """Validation loops run under no_grad / inference_mode; the check still compares gradients."""
    registry["cpu"] = FakeBackend("cpu")
    with lmfloss_kernels.options(check_backend=True), mode():
        logits, target = torch.randn(2, 3, 4, 5), torch.randint(0, 3, (2, 4, 5))  # inference tensors in that mode
        F.unified_focal_loss(logits, target, backend="cpu")
        F.lmf_loss(logits, target, [4, 3, 2], backend="cpu")
        registry["cpu"] = FakeBackend("cpu", gradient_error=1e-2)
        with pytest.raises(lmfloss_kernels.BackendMismatchError, match="gradient error"):
            F.unified_focal_loss(logits, target, backend="cpu", reduction="none")


def test_options_switches():
    before = lmfloss_kernels.get_options()
    with lmfloss_kernels.options(check_labels=True) as current:
        assert current.check_labels and lmfloss_kernels.get_options().check_labels
    assert lmfloss_kernels.get_options() == before
    previous = lmfloss_kernels.set_options(check_backend=True)
    try:
        assert lmfloss_kernels.get_options().check_backend
    finally:
        lmfloss_kernels.set_options(check_backend=previous.check_backend)
    with pytest.raises(ValueError, match="unknown option 'check_everything'"):
        lmfloss_kernels.set_options(check_everything=True)
    with pytest.raises(TypeError, match="option 'check_labels' must be a bool, got int"):
        lmfloss_kernels.set_options(check_labels=1)


# ----------------------------------------------------------------------------------------------
# Dtypes, shapes, and not touching the user's tensors


ALL_LOSSES = {
    "lmf": lambda x, y, **kw: F.lmf_loss(x, y, [7, 3, 2], **kw),
    "ldam": lambda x, y, **kw: F.ldam_loss(x, y, [7, 3, 2], **kw),
    "focal": lambda x, y, **kw: F.focal_loss(x, y, **kw),
    "unified": F.unified_focal_loss,
    "focal_tversky": F.focal_tversky_loss,
    "symmetric_focal": F.symmetric_focal_loss,
    "asymmetric_focal": F.asymmetric_focal_loss,
    "mixed": F.mixed_focal_loss,
    "tversky": F.tversky_loss,
    "dice": F.dice_loss,
}


@pytest.mark.parametrize("name", list(ALL_LOSSES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_loss_dtype_and_gradient_dtype(name, dtype):
    x = torch.randn(2, 3, 4, 3).to(dtype).requires_grad_(True)
    y = torch.randint(0, 3, (2, 4, 3))
    value = ALL_LOSSES[name](x, y, backend="reference")
    value.backward()
    assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert value.shape == ()
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_none_shapes(name):
    x = torch.randn(2, 3, 4, 5)
    y = torch.randint(0, 3, (2, 1, 4, 5))
    value = ALL_LOSSES[name](x, y, reduction="none", backend="reference")
    assert value.shape == ((2, 4, 5) if name in ("lmf", "ldam", "focal") else (2,))


@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_user_tensors_are_not_modified(name):
    x = torch.randn(2, 3, 5, 4, requires_grad=True)
    y = torch.randint(0, 3, (2, 5, 4)).to(torch.uint8)
    x_copy, y_copy = x.detach().clone(), y.clone()
    ALL_LOSSES[name](x, y, backend="reference").backward()
    assert torch.equal(x.detach(), x_copy) and torch.equal(y, y_copy)


def test_usable_after_a_call_in_inference_mode():
    """Regression: per-class constants cached during inference_mode must not poison later training calls."""
    x = torch.randn(2, 3, 4, 5)
    y = torch.randint(0, 3, (2, 4, 5))
    with torch.inference_mode():
        for fn in ALL_LOSSES.values():
            fn(x, y, backend="reference")
    for name, fn in ALL_LOSSES.items():
        z = x.clone().requires_grad_(True)
        fn(z, y, backend="reference").backward()
        assert torch.isfinite(z.grad).all(), name


def test_label_range_is_checked_on_cpu_without_the_option():
    assert not lmfloss_kernels.get_options().check_labels
    with pytest.raises(ValueError, match=r"target labels must be in \[0, 2\]"):
        F.unified_focal_loss(torch.randn(1, 3, 4), torch.tensor([[0, 1, 3, 2]]), backend="reference")


def test_check_labels_option_skips_shape_only_tensors():
    """Meta tensors carry no values; the label check must not try to read them (module dry runs use them)."""
    with lmfloss_kernels.options(check_labels=True):
        value = F.unified_focal_loss(
            torch.zeros(1, 3, 4, device="meta"), torch.zeros(1, 4, dtype=torch.long, device="meta"), backend="reference"
        )
    assert value.device.type == "meta"


def test_every_loss_accepts_the_ignore_index_keyword_and_reduction():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 4, 5))
    y[0, 0, 0] = 9
    for name, fn in ALL_LOSSES.items():
        for reduction in ("mean", "sum", "none"):
            value = fn(x, y, ignore_index=9, reduction=reduction, backend="reference")
            assert torch.isfinite(value).all(), (name, reduction)


@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_non_finite_logits_propagate(name):
    """Documented policy: NaN logits are not hidden, the loss is NaN."""
    x = torch.randn(2, 3, 4, 3)
    x[1, 2, 3, 0] = float("nan")
    assert torch.isnan(ALL_LOSSES[name](x, torch.randint(0, 3, (2, 4, 3)), backend="reference"))


def test_functional_lmf_reuses_its_device_margins():
    """Host-side class counts: the margins are built once per (counts, max_m, device, dtype), not per call."""
    logits = torch.randn(4, 3)
    first = F._cached_margins([30, 20, 10], 0.5, logits)
    assert F._cached_margins((30, 20, 10), 0.5, logits) is first
    assert F._cached_margins([30, 20, 10], 0.4, logits) is not first
    torch.testing.assert_close(first, F.ldam_margins([30, 20, 10]))


def test_a_backend_that_fails_to_import_does_not_stop_the_others(registry, monkeypatch, tmp_path):
    (tmp_path / "lmfloss_broken_backend.py").write_text("def oops(:\n")  # a SyntaxError at import
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(_backends._LOCATIONS, "cpu", "lmfloss_broken_backend:BACKEND")
    del registry["cpu"]
    with pytest.warns(RuntimeWarning, match="cpu: it could not be imported \\(SyntaxError"):
        assert _region_call("auto").requires_grad
    with pytest.raises(ValueError, match="backend 'cpu' cannot serve.*SyntaxError"):
        _region_call("cpu")
