"""torch.compile(fullgraph=True) of a criterion in a fresh interpreter.

Backends are imported lazily; a criterion first called inside a compiled graph must already
have its backend imported (dynamo does not trace importlib), which criteria ensure when they
are built. The check needs a process in which no test has imported a backend yet.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import torch
    import lmfloss_kernels as lk

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 6, requires_grad=True)
    labels = torch.randint(0, 3, (2, 5, 6), dtype=torch.uint8)
    criterion = lk.UnifiedFocalLoss(backend="{backend}")
    compiled = torch.compile(criterion, fullgraph=True, backend="aot_eager")
    value = compiled(logits, labels)
    (grad,) = torch.autograd.grad(value, logits)
    expected = lk.functional.unified_focal_loss(logits, labels, backend="reference")
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-8)
    print("ok")
    """
)


def _run(backend: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(backend=backend)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_compiled_triton_criterion_in_fresh_process():
    _run("triton")


def test_compiled_auto_criterion_in_fresh_process():
    _run("auto")
