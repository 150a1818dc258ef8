"""The benchmark runner keeps working: its pieces, and ``python -m bench --quick`` end to end.

Benchmarks themselves live in ``bench/`` (``pytest bench/``, ``python -m bench``); these tests
only check that the runner measures what it says and writes complete results.
"""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import measure, runner
from bench.workloads import WORKLOADS, bytes_moved, family_call, logits_shape, make_inputs, monai_loss
from lmfloss_kernels import reference

ROOT = Path(__file__).resolve().parent.parent


CASES = [(name, kind) for name, w in sorted(WORKLOADS.items()) for kind in w.target_kinds]


@pytest.mark.parametrize(("loss", "target_kind"), CASES)
def test_recorded_family_call_reproduces_the_public_loss(loss, target_kind):
    # The compiled provider runs the reference family with the arguments recorded from the public
    # API; uncompiled, those must give exactly the public loss and gradient.
    workload = WORKLOADS[loss]
    shape = logits_shape(workload, 5 if workload.dense else 37, 3)
    x, t = make_inputs(workload, shape, torch.float32, target_kind, "cpu")
    family, vectors, kwargs = family_call(workload, x, t)
    assert family == workload.family
    recorded = getattr(reference, family)(x, t, *vectors, **kwargs)
    (grad_recorded,) = torch.autograd.grad(recorded, x)
    public = workload.call(x, t, backend="reference")
    (grad_public,) = torch.autograd.grad(public, x)
    torch.testing.assert_close(recorded, public, rtol=0, atol=0)
    torch.testing.assert_close(grad_recorded, grad_public, rtol=0, atol=0)


@pytest.mark.parametrize(("loss", "target_kind"), CASES)
def test_monai_equivalents_run(loss, target_kind):
    workload = WORKLOADS[loss]
    shape = logits_shape(workload, 6 if workload.dense else 33, 4)
    x, t = make_inputs(workload, shape, torch.float32, target_kind, "cpu")
    value = monai_loss(workload, 4, target_kind)(x, t)
    (grad,) = torch.autograd.grad(value, x)
    assert value.dim() == 0 and math.isfinite(float(value.detach()))
    assert grad.shape == x.shape and bool(torch.isfinite(grad).all())


def test_bytes_moved_follow_the_bandwidth_model():
    workload = WORKLOADS["ufl_asym"]
    x, t = make_inputs(workload, (2, 3, 4, 5, 6), torch.bfloat16, "labels", "cpu")
    logits_bytes, label_bytes = 2 * 3 * 120 * 2, 2 * 120 * 1
    assert bytes_moved("forward", x, t) == logits_bytes + label_bytes
    assert bytes_moved("nograd", x, t) == logits_bytes + label_bytes
    assert bytes_moved("backward", x, t) == 2 * logits_bytes + label_bytes
    assert bytes_moved("full", x, t) == 3 * logits_bytes + 2 * label_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU memory method reads /proc")
def test_cpu_peak_memory_sees_a_live_buffer_and_not_a_freed_one():
    assert measure.prepare_rss()
    size = 48 << 20
    first = measure.peak_extra_bytes(lambda: torch.ones(size // 4).sum(), torch.device("cpu"))
    # Allocated and freed before: a fresh measurement must see it again, not a cached block.
    second = measure.peak_extra_bytes(lambda: torch.ones(size // 4).sum(), torch.device("cpu"))
    for peak in (first, second):
        assert 0.9 * size <= peak <= 1.2 * size


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU memory method reads /proc")
def test_cpu_peak_memory_counts_a_freed_temporary_once():
    # Timed repetitions leave large free blocks in the caller's glibc arena; a temporary that
    # reuses one and is freed must not be counted again next to the result that follows it.
    assert measure.prepare_rss()
    filler = [torch.ones(1 << 20) for _ in range(24)]
    del filler
    kept = []

    def call():
        temporary = torch.ones(1 << 20)  # 4 MiB, freed before the result exists
        del temporary
        kept.append(torch.ones(1 << 21))  # 8 MiB result

    peak = measure.peak_extra_bytes(call, torch.device("cpu"))
    assert (8 << 20) * 0.95 <= peak <= (8 << 20) * 1.15


def test_overrides_and_expansion():
    args = runner.parse_args(["--losses", "ufl_asym,lmf_rows", "--sizes", "8,12", "--rows", "1k", "--modes", "full"])
    cases = runner.expand(runner.apply_overrides(runner.default_plan(torch.device("cpu")), args))
    dense = {c.size for c in cases if c.loss == "ufl_asym"}
    assert dense == {8, 12}
    assert {c.size for c in cases if c.loss == "lmf_rows"} == {1024}
    assert {c.modes for c in cases} == {("full",)}
    keys = [(c.loss, c.size, c.classes, c.dtype, c.target) for c in cases]
    assert len(keys) == len(set(keys))
    with pytest.raises(SystemExit):
        runner.parse_args(["--providers", "nonsense"])


def test_quick_run_writes_table_csv_json_and_plots(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)  # the runner must skip Triton on the CPU by itself
    command = [
        sys.executable,
        "-m",
        "bench",
        "--quick",
        "--threads",
        "1",
        "--providers",
        "eager,monai,triton,cuda,cpu",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "median ms" in out and "vs eager" in out and "copy bandwidth" in out
    quick = runner.expand(runner.quick_plan())
    for loss in {c.loss for c in quick}:
        assert loss in out

    (csv_path,) = tmp_path.glob("*.csv")
    (json_path,) = tmp_path.glob("*.json")
    assert list(tmp_path.glob("*.md")) and list(tmp_path.glob("*.png"))
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    data = json.loads(json_path.read_text())
    assert len(rows) == len(data["rows"])
    for key in ("device", "torch", "triton", "cuda", "lmfloss_kernels", "git_commit", "date", "copy_bandwidth_gbs"):
        assert key in data["meta"]
    assert "triton" in {s["provider"] for s in data["not_run"]}

    expected = {(c.loss, m) for c in quick for m in c.modes}
    for provider in ("eager", "monai"):
        assert {(r["loss"], r["mode"]) for r in rows if r["provider"] == provider} == expected
    for row in data["rows"]:
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["bandwidth_frac"] > 0 and row["bytes_moved"] > 0
        assert row["peak_extra_mb"] >= 0
        if row["provider"] == "eager":
            assert row["vs_eager"] == 1.0
