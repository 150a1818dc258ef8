"""The benchmark runner keeps working: its pieces, and ``python -m bench --quick`` end to end.

Benchmarks themselves live in ``bench/`` (``pytest bench/``, ``python -m bench``); these tests
only check that the runner measures what it says and writes complete results.
"""

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import measure, report, runner
from bench.workloads import WORKLOADS, bytes_moved, family_call, logits_shape, make_inputs, monai_loss, voxels
from lmfloss_kernels import available_backends, reference

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


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_default_plans_sweep_every_loss_and_class_count_over_sizes(device):
    # The plots (time and memory against size) need a (loss, dtype, target, C) group of fwd+bwd
    # rows at two sizes or more: every loss and class count of a default plan must have one.
    groups: dict[tuple, dict[tuple, set[int]]] = {}
    for case in runner.expand(runner.default_plan(torch.device(device))):
        if "full" in case.modes:
            groups.setdefault((case.loss, case.classes), {}).setdefault((case.dtype, case.target), set()).add(case.size)
    assert {loss for loss, _ in groups} == set(WORKLOADS)
    for key, sizes in groups.items():
        assert max(len(s) for s in sizes.values()) >= 2, key


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


def _row(provider: str, peak: float, grad_bytes: int) -> dict:
    # A complete results row as run_case builds it, with chosen memory figures.
    return {
        "loss": "lmf_rows",
        "shape": "16384x4",
        "voxels": 16384,
        "classes": 4,
        "dtype": "fp32",
        "target": "i64 labels",
        "mode": "full",
        "provider": provider,
        "median_ms": 2.0,
        "p20_ms": 1.5,
        "p80_ms": 2.5,
        "reps": 3,
        "input_copies": 1,
        **runner.memory_figures(peak, grad_bytes, torch.device("cpu")),
        "bytes_moved": 1000,
        "bandwidth_gbs": 0.5,
        "bandwidth_frac": 0.05,
        "vs_eager": 1.0,
        "vs_compile": math.nan,
    }


def test_peaks_below_the_memory_resolution_are_bounds_not_zeros(tmp_path):
    cpu, grad_bytes = torch.device("cpu"), 256 << 10
    floor = measure.memory_floor_bytes(cpu)
    assert floor == 64 << 10
    below = runner.memory_figures(4096.0, grad_bytes, cpu)
    assert below["peak_below_floor"] and math.isnan(below["peak_extra_mb"]) and math.isnan(below["peak_over_grad"])
    at_floor = runner.memory_figures(float(floor), grad_bytes, cpu)
    assert not at_floor["peak_below_floor"]
    assert (at_floor["peak_extra_mb"], at_floor["peak_over_grad"]) == (0.0625, 0.25)
    # Not measurable (NaN) is not "below the floor"; CUDA's allocator statistics are exact, so
    # a zero peak there is a zero.
    unmeasurable = runner.memory_figures(math.nan, grad_bytes, cpu)
    assert not unmeasurable["peak_below_floor"] and math.isnan(unmeasurable["peak_extra_mb"])
    cuda = runner.memory_figures(0.0, grad_bytes, torch.device("cuda"))
    assert not cuda["peak_below_floor"] and cuda["peak_extra_mb"] == 0.0

    rows = [_row("eager", 3 * 2**20, grad_bytes), _row("cpu", 4096.0, grad_bytes)]
    meta = report.metadata(cpu, 1e10, 1.0, ["python -m bench"])
    assert meta["memory_floor_mb"] == 0.0625
    eager_line, cpu_line = report.format_table(rows, {}, [], meta).splitlines()[2:4]
    assert "3.0" in eager_line and "12.00" in eager_line and "<" not in eager_line
    assert "< 0.06" in cpu_line and "< 0.25" in cpu_line
    paths = report.write(rows, meta, {}, [], str(tmp_path), plots=False)
    csv_path, json_path, md_path = paths
    with open(csv_path) as f:
        eager_csv, cpu_csv = csv.DictReader(f)
    assert float(eager_csv["peak_extra_mb"]) == 3.0 and eager_csv["peak_below_floor"] == "False"
    assert (cpu_csv["peak_extra_mb"], cpu_csv["peak_over_grad"], cpu_csv["peak_below_floor"]) == (
        "<0.0625",
        "<0.25",
        "True",
    )
    eager_json, cpu_json = json.loads(json_path.read_text())["rows"]
    assert eager_json["peak_extra_mb"] == 3.0 and eager_json["peak_below_floor"] is False
    assert cpu_json["peak_extra_mb"] is None and cpu_json["peak_over_grad"] is None and cpu_json["peak_below_floor"]
    assert "| < 0.06 | < 0.25 |" in md_path.read_text()


def _run_quick(tmp_path: Path, *flags: str) -> tuple[str, list[dict], dict]:
    """``python -m bench --quick`` on the CPU in a fresh process: (stdout, CSV rows, JSON data)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)  # the runner must skip Triton on the CPU by itself
    command = [sys.executable, "-m", "bench", "--quick", "--threads", "1", "--device", "cpu", "--out", str(tmp_path)]
    done = subprocess.run([*command, *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (csv_path,) = tmp_path.glob("*.csv")
    (json_path,) = tmp_path.glob("*.json")
    with open(csv_path) as f:
        csv_rows = list(csv.DictReader(f))
    data = json.loads(json_path.read_text())
    assert len(csv_rows) == len(data["rows"])
    for key in ("device", "torch", "triton", "cuda", "lmfloss_kernels", "git_commit", "date", "copy_bandwidth_gbs"):
        assert key in data["meta"]
    for row, csv_row in zip(data["rows"], csv_rows, strict=True):
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["bandwidth_frac"] > 0 and row["bytes_moved"] > 0
        if row["peak_below_floor"]:
            assert row["peak_extra_mb"] is None and csv_row["peak_extra_mb"] == "<0.0625"
        else:
            assert row["peak_extra_mb"] >= data["meta"]["memory_floor_mb"]
        if row["provider"] == "eager":
            assert row["vs_eager"] == 1.0
    return done.stdout, csv_rows, data


def _runs_here(provider: str, dtype: str) -> bool:
    """Whether the runner must time ``provider`` for ``dtype`` logits on this CPU."""
    if provider in ("eager", "compile"):
        return True
    if provider == "monai":
        return importlib.util.find_spec("monai") is not None
    # Triton's only CPU mode is its interpreter, which the runner refuses to time.
    return provider != "triton" and provider in available_backends("cpu", runner.DTYPES[dtype])


def _expected_keys(cases: list, provider: str) -> set[tuple]:
    return {
        (c.loss, voxels(logits_shape(WORKLOADS[c.loss], c.size, c.classes)), c.classes, c.dtype, c.target, mode)
        for c in cases
        if _runs_here(provider, c.dtype)
        for mode in c.modes
    }


def _row_keys(rows: list[dict], provider: str) -> set[tuple]:
    def kind(row):
        return "onehot" if row["target"].startswith("one-hot") else "labels"

    return {
        (r["loss"], r["voxels"], r["classes"], r["dtype"], kind(r), r["mode"])
        for r in rows
        if r["provider"] == provider
    }


def _check_providers(data: dict, cases: list, providers: tuple[str, ...]) -> None:
    # Every provider that can run here has a row for every case and mode; the runner catches a
    # failing provider into not_run, so not_run must hold nothing but genuinely missing ones.
    for provider in providers:
        assert _row_keys(data["rows"], provider) == _expected_keys(cases, provider), provider
    reasons = {"triton": "TRITON_INTERPRET", "monai": "not installed", "cuda": "is not available"}
    for entry in data["not_run"]:
        assert "mode" not in entry, f"{entry['provider']} failed: {entry['reason']}"
        assert not _runs_here(entry["provider"], entry["dtype"]), entry
        assert reasons.get(entry["provider"], "is not available") in entry["reason"], entry
    missing = {p for p in providers for c in cases if not _runs_here(p, c.dtype)}
    assert {entry["provider"] for entry in data["not_run"]} == missing


def test_quick_run_writes_table_csv_json_and_plots(tmp_path):
    # Every provider but torch.compile (which compiles a graph per loss: see the next test).
    providers = ("eager", "monai", "triton", "cuda", "cpu")
    out, _, data = _run_quick(tmp_path, "--providers", ",".join(providers))
    assert "median ms" in out and "vs eager" in out and "copy bandwidth" in out
    quick = runner.expand(runner.quick_plan())
    for loss in {c.loss for c in quick}:
        assert loss in out
    assert list(tmp_path.glob("*.md")) and list(tmp_path.glob("*.png"))
    assert "triton" in {s["provider"] for s in data["not_run"]}
    _check_providers(data, quick, providers)


def test_quick_run_times_the_compiled_reference(tmp_path):
    # One tiny case keeps this to a single torch.compile (C++ codegen on the CPU).
    flags = ["--losses", "ufl_asym", "--targets", "labels", "--sizes", "12", "--modes", "full"]
    providers = ("eager", "compile", "cpu")
    _, _, data = _run_quick(tmp_path, *flags, "--providers", ",".join(providers), "--no-plots")
    cases = runner.expand(runner.apply_overrides(runner.quick_plan(), runner.parse_args(["--quick", *flags])))
    assert len(cases) == 1
    _check_providers(data, cases, providers)
    by_provider = {row["provider"]: row for row in data["rows"]}
    assert by_provider["compile"]["vs_compile"] == 1.0
    assert by_provider["eager"]["vs_compile"] > 0


def test_a_stopped_run_keeps_every_row_it_finished(tmp_path, monkeypatch):
    # A time limit kills the benchmark mid-plan: the rows measured before that must already be in
    # the CSV and JSON (marked incomplete), not only written at the end.
    measured = []
    real_runner = runner.mode_runner

    def stop_at_the_fourth_row(mode, fn, inputs):
        if len(measured) == 3:
            raise KeyboardInterrupt  # not an Exception: the runner must not swallow it
        measured.append(mode)
        return real_runner(mode, fn, inputs)

    monkeypatch.setattr(runner, "mode_runner", stop_at_the_fourth_row)
    monkeypatch.setattr(runner.gc, "freeze", lambda: None)
    flags = ["--quick", "--device", "cpu", "--providers", "eager", "--losses", "lmf_rows", "--no-plots"]
    with pytest.raises(KeyboardInterrupt):
        runner.main([*flags, "--modes", "forward,nograd", "--dtypes", "fp32,bf16", "--out", str(tmp_path)])
    (csv_path,) = tmp_path.glob("*.csv")
    (json_path,) = tmp_path.glob("*.json")
    assert not list(tmp_path.glob("*.part"))
    data = json.loads(json_path.read_text())
    with open(csv_path) as f:
        csv_rows = list(csv.DictReader(f))
    assert data["meta"]["complete"] is False
    assert [row["mode"] for row in data["rows"]] == measured == ["forward", "nograd", "forward"]
    assert [row["dtype"] for row in data["rows"]] == ["fp32", "fp32", "bf16"]
    assert [(row["mode"], row["complete"]) for row in csv_rows] == [(m, "False") for m in measured]
    assert all(row["median_ms"] > 0 for row in data["rows"])
