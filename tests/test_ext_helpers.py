"""Shared helpers of the C++ extension tests (``backend="cpu"``), and the loader's tests.

Tolerances (design.md): float32 loss within 1e-5 relative, gradient within 1e-5 of the
reference gradient's norm; float64 within 1e-10. float16 / bfloat16: the Cut Cross-Entropy
rule, the fused error against the float64 truth is no worse than the error of the reference
computed in the low dtype itself, plus a small tolerance.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmfloss_kernels
from lmfloss_kernels import ext
from lmfloss_kernels.ext import _loader

requires_ext = pytest.mark.skipif(ext.LOAD_ERROR is not None, reason=f"C++ extension not loaded: {ext.LOAD_ERROR}")

LOW_PRECISION_TOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}
LOW_PRECISION_CEILING = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def loss_and_grad(function, logits, *args, grad_output=None, **kwargs):
    """``(loss, d(loss . grad_output)/d logits)`` for a fresh leaf copy of ``logits`` (layout kept)."""
    x = logits.detach().clone().requires_grad_(True)
    loss = function(x, *args, **kwargs)
    if grad_output is None:
        grad_output = torch.ones_like(loss)
    (grad,) = torch.autograd.grad(loss, x, grad_output.to(loss.dtype))
    return loss.detach(), grad


def assert_close(actual, expected, what: str, rtol: float) -> None:
    """Norm-wise relative error (with a tiny absolute floor for an all-zero reference)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    actual, expected = actual.double(), expected.double()
    assert bool(torch.isfinite(actual).all()), f"{what}: non-finite values {actual.flatten()[:8].tolist()}"
    error = float((actual - expected).norm())
    bound = rtol * float(expected.norm()) + 1e-13
    assert error <= bound, f"{what}: error norm {error:.3e} > {bound:.3e} (reference norm {float(expected.norm()):.3e})"


def assert_no_worse_than_reference(fused, same_dtype, truth, dtype, what: str) -> None:
    fused, same_dtype, truth = fused.double(), same_dtype.double(), truth.double()
    assert bool(torch.isfinite(fused).all()), f"{what}: non-finite fused values"
    scale = float(truth.norm()) + 1e-12
    fused_error = float((fused - truth).norm()) / scale
    reference_error = float((same_dtype - truth).norm()) / scale
    if reference_error != reference_error:
        reference_error = float("inf")
    bound = min(reference_error + LOW_PRECISION_TOL[dtype], LOW_PRECISION_CEILING[dtype])
    assert fused_error <= bound, (
        f"{what}: fused error {fused_error:.3e} vs same-dtype reference {reference_error:.3e} (bound {bound:.3e})"
    )


def compare_with_reference(reference_fn, fused_fn, logits, *args, grad_output=None, **kwargs):
    """Loss and gradient of the fused function against the reference, by the dtype's rule."""
    dtype = logits.dtype
    actual = loss_and_grad(fused_fn, logits, *args, grad_output=grad_output, **kwargs)
    if dtype in RTOL:
        expected = loss_and_grad(reference_fn, logits, *args, grad_output=grad_output, **kwargs)
        assert actual[0].dtype == expected[0].dtype, f"loss dtype {actual[0].dtype} vs {expected[0].dtype}"
        assert actual[1].dtype == dtype
        assert_close(actual[0], expected[0], "loss", RTOL[dtype])
        assert_close(actual[1], expected[1], "gradient", RTOL[dtype])
        return
    truth = loss_and_grad(reference_fn, logits.double(), *args, grad_output=grad_output, **kwargs)
    low = loss_and_grad(reference_fn, logits, *args, grad_output=grad_output, upcast=False, **kwargs)
    assert actual[1].dtype == dtype and actual[0].dtype == torch.float32
    assert_no_worse_than_reference(actual[0], low[0], truth[0], dtype, "loss")
    assert_no_worse_than_reference(actual[1], low[1], truth[1], dtype, "gradient")


# Loader ------------------------------------------------------------------------------------


def test_mismatched_torch_version_is_reported():
    info = {"torch": "1.0.0", "torch_cuda": None, "with_cuda": False}
    reason = _loader._mismatch(info)
    assert reason is not None and "torch 1.0.0" in reason and torch.__version__ in reason


def test_matching_build_info_is_accepted():
    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "with_cuda": True}
    assert _loader._mismatch(info) is None
    if torch.version.cuda is not None:
        info["torch_cuda"] = "1.0"
        assert "CUDA 1.0" in _loader._mismatch(info)


def test_missing_or_stale_library_warns_once_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(_loader.importlib.util, "find_spec", lambda name: None)
    with pytest.warns(RuntimeWarning, match="pip install --no-build-isolation -e ."):
        info, reason = _loader.load()
    assert info is None and "not built" in reason

    library = tmp_path / "_C.so"
    library.write_bytes(b"")
    (tmp_path / "_build_info.json").write_text(json.dumps({"torch": "1.0.0", "with_cuda": False}))

    class Spec:
        origin = str(library)

    monkeypatch.setattr(_loader.importlib.util, "find_spec", lambda name: Spec())
    with pytest.warns(RuntimeWarning) as record:
        info, reason = _loader.load()
    assert len(record) == 1 and "built against torch 1.0.0" in str(record[0].message)
    assert info is None and "1.0.0" in reason


@requires_ext
def test_build_info_describes_this_build():
    assert ext.BUILD_INFO["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(ext.BUILD_INFO["with_cuda"], bool)
    assert ext.CPU_BACKEND.unavailable_reason(torch.device("cpu"), torch.float32) is None
    assert ext.CPU_BACKEND.unavailable_reason(torch.device("cpu"), torch.int64) is not None
    assert "cpu tensors only" in ext.CPU_BACKEND.unavailable_reason(torch.device("cuda"), torch.float32)
    if not torch.cuda.is_available():
        assert ext.CUDA_BACKEND.unavailable_reason(torch.device("cuda"), torch.float32) is not None


@pytest.mark.parametrize("defect", ["missing", "stale"])
def test_a_broken_extension_is_reported_once_at_import(tmp_path, defect):
    # A copy of the package whose library is missing or was built against another torch: the
    # import warns once, at the user's import line, and the fallback of "auto" does not warn again.
    package = tmp_path / "lmfloss_kernels"
    shutil.copytree(Path(lmfloss_kernels.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    if defect == "missing":
        for library in package.glob("_C*.so"):
            library.unlink()
    else:
        info = {"torch": "1.0.0", "torch_cuda": None, "with_cuda": False}
        (package / "_build_info.json").write_text(json.dumps(info))
    script = tmp_path / "user_script.py"
    script.write_text(
        "import sys, warnings\n"
        # An editable install's finder would resolve lmfloss_kernels._C to the source tree.
        "sys.meta_path = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as at_import:\n"
        "    import lmfloss_kernels\n"
        "import torch\n"
        "with warnings.catch_warnings(record=True) as at_call:\n"
        "    lmfloss_kernels.functional.dice_loss(torch.randn(1, 2, 3), torch.zeros(1, 3, dtype=torch.long))\n"
        f"assert lmfloss_kernels.__file__.startswith({str(package)!r}), lmfloss_kernels.__file__\n"
        "assert lmfloss_kernels.available_backends('cpu') == ['reference'], lmfloss_kernels.available_backends('cpu')\n"
        "for w in at_import + at_call:\n"
        "    print(w.filename, w.lineno, w.message, sep='|')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(tmp_path)
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    (line,) = run.stdout.splitlines()
    filename, lineno, message = line.split("|")
    assert filename == str(script) and lineno == "5"  # the import line
    assert ("not built" if defect == "missing" else "built against torch 1.0.0") in message
    assert "pip install --no-build-isolation -e ." in message


def test_library_built_for_a_newer_x86_level_than_this_cpu_is_refused():
    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "with_cuda": False, "cpu_arch": "x86-64-v3"}
    v3 = {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "sse4_2"}
    assert _loader._mismatch(info, v3) is None
    reason = _loader._mismatch(info, v3 - {"avx2", "fma"})
    assert "built for x86-64-v3" in reason and "lacks avx2, fma" in reason and "LMFLOSS_CPU_ARCH=x86-64" in reason
    assert "avx512f" in _loader._mismatch({**info, "cpu_arch": "x86-64-v4"}, v3)
    for portable in (None, "x86-64", "native"):
        assert _loader._mismatch({**info, "cpu_arch": portable}, set()) is None
