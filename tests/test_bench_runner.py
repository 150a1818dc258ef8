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
import warnings
from pathlib import Path

import pytest
import torch

from bench import dropin, measure, overhead, overhead_stage, report, runner
from bench.workloads import WORKLOADS, bytes_moved, family_call, logits_shape, make_inputs, monai_loss, voxels
from lmfloss_kernels import available_backends, reference

ROOT = Path(__file__).resolve().parent.parent

CASES = [(name, kind) for name, w in sorted(WORKLOADS.items()) if w.dropin is None for kind in w.target_kinds]
DROPINS = sorted(name for name, w in WORKLOADS.items() if w.dropin is not None)


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
        "path": runner.PATHS.get(provider, "fused"),
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
        "vs_library": math.nan,
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
    command.append("--no-overhead")  # measured by its own test
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
        assert csv_row["path"] == row["path"]
        if row["path"] == "delegated":  # never reported as ours: a reason, and no speed-up
            assert f"{row['loss']} {row['provider']}" in data["delegated"]
            assert row["vs_eager"] is row["vs_compile"] is row["vs_library"] is None
        elif row["provider"] == "eager":
            assert row["vs_eager"] == 1.0
    return done.stdout, csv_rows, data


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _runs_here(provider: str, case) -> bool | None:
    """Whether the runner must time ``provider`` for ``case`` (its loss and dtype) on this CPU; None
    where the provider does not apply (a library's class for another library's criterion)."""
    workload = WORKLOADS[case.loss]
    if provider in ("monai", "nnunet"):
        if workload.dropin is None:
            return _installed("monai") if provider == "monai" else None
        return _installed(workload.dropin.library) if provider == workload.dropin.provider else None
    if provider == "compile" and workload.dropin is not None:  # torch.compile of the library's class
        return _installed(workload.dropin.library)
    if provider in ("eager", "compile"):
        return True
    # Triton's only CPU mode is its interpreter, which the runner refuses to time.
    return provider != "triton" and provider in available_backends("cpu", runner.DTYPES[case.dtype])


def _expected_keys(cases: list, provider: str) -> set[tuple]:
    return {
        (c.loss, voxels(logits_shape(WORKLOADS[c.loss], c.size, c.classes)), c.classes, c.dtype, c.target, mode)
        for c in cases
        if _runs_here(provider, c)
        for mode in c.modes
    }


def _row_keys(rows: list[dict], provider: str) -> set[tuple]:
    def kind(row):
        return {"one-hot": "onehot", "multi-hot": "multihot"}.get(row["target"].split()[0], "labels")

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
    reasons = {"triton": "TRITON_INTERPRET", "cuda": "is not available"}
    for entry in data["not_run"]:
        assert "mode" not in entry, f"{entry['provider']} failed: {entry['reason']}"
        case = runner.Case(entry["loss"], 0, 0, entry["dtype"], "", ())
        assert _runs_here(entry["provider"], case) is False, entry
        assert reasons.get(entry["provider"], "not installed") in entry["reason"], entry
    missing = {p for p in providers for c in cases if _runs_here(p, c) is False}
    assert {entry["provider"] for entry in data["not_run"]} == missing
    # A provider that does not apply leaves neither a row nor a note.
    for c in cases:
        for p in providers:
            if _runs_here(p, c) is None:
                assert not [r for r in data["rows"] if r["loss"] == c.loss and r["provider"] == p], (c, p)


def test_quick_run_writes_table_csv_json_and_plots(tmp_path):
    # Every provider but torch.compile (which compiles a graph per loss: see the next test).
    providers = ("eager", "monai", "nnunet", "triton", "cuda", "cpu")
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


# --------------------------------------------------------------------------------------------
# Drop-in criteria (MONAI / nnU-Net classes against ours) and the per-call overhead stage


@pytest.mark.parametrize("loss", DROPINS)
def test_dropin_targets_are_what_the_library_takes(loss):
    workload = WORKLOADS[loss]
    classes = 3 if workload.target_kinds == ("multihot",) else 4
    x, t = make_inputs(workload, logits_shape(workload, 5, classes), torch.float32, workload.target_kinds[0], "cpu")
    batch, _, *spatial = x.shape
    if workload.dropin.target_kind == "labels":
        assert t.shape == (batch, 1, *spatial) and t.dtype == torch.uint8
        assert int(t.min()) >= 0 and int(t.max()) < classes
    else:
        # Nested overlapping regions (BraTS: WT contains TC contains ET): a voxel in region c is in
        # every region before it, and some voxels are in more than one region.
        assert t.shape == x.shape and t.dtype == x.dtype and set(t.unique().tolist()) <= {0.0, 1.0}
        assert bool((t[:, 1:] <= t[:, :-1]).all())
        assert bool((t.sum(1) >= 2).any()) and bool((t.sum(1) == 0).any())
    assert report.provider_label({"provider": "cpu", "path": "fused"}) == "cpu"
    assert workload.target_kinds == (workload.dropin.target_kind,)


@pytest.mark.parametrize("loss", DROPINS)
def test_dropin_rows_compare_the_same_function(loss):
    # Ours and the library's class, built as the runner builds them, must agree on fresh random
    # inputs (odd sizes): a row against the library is then a comparison of equals.
    dropin_spec = WORKLOADS[loss].dropin
    theirs = dropin_spec.theirs()
    if theirs is None:
        pytest.skip(f"{dropin_spec.library} is not installed")
    workload = WORKLOADS[loss]
    classes = 3 if workload.target_kinds == ("multihot",) else 4
    shape = (2, classes, 5, 7, 3)
    x, t = make_inputs(workload, shape, torch.float64, workload.target_kinds[0], "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a delegated option warns; the value is checked all the same
        ours = dropin_spec.ours("cpu" if "cpu" in available_backends("cpu", torch.float64) else "reference")
        value, expected = ours(x, t), theirs(x, t)
    (grad,) = torch.autograd.grad(value, x)
    (expected_grad,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(value.double(), expected.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)


class _LibraryDice(torch.nn.Module):
    """Stands in for a library's class: a module defined in a ``monai`` module."""

    def forward(self, x, t):
        return (torch.sigmoid(x) * t).mean()


_LibraryDice.__module__ = "monai.losses.dice"


def test_call_path_sees_a_library_module_and_a_not_fused_warning_every_time():
    x, t = torch.randn(2, 3, 4), torch.rand(2, 3, 4)
    library = _LibraryDice()

    class Wrapper(torch.nn.Module):
        def forward(self, a, b):
            return library(a, b)

    assert dropin.call_path(lambda a, b: (a * b).sum(), x, t) == (dropin.FUSED, "")
    path, why = dropin.call_path(Wrapper(), x, t)
    assert path == dropin.DELEGATED and "monai.losses.dice._LibraryDice" in why
    # The package warns once per process and reason; the probe must still see it on every call.
    from lmfloss_kernels import _compat

    def warns_once(a, b):
        _compat.warn_once("Ours", "option=1", "monai.losses.Dice")
        return (a * b).sum()

    before = set(_compat._warned)
    for _ in range(2):
        path, why = dropin.call_path(warns_once, x, t)
        assert path == dropin.DELEGATED and "option=1" in why and "not fused" in why
    assert ("Ours", "option=1") in _compat._warned and before <= _compat._warned
    _compat._warned.discard(("Ours", "option=1"))
    # No hook is left behind: later calls of library modules are not recorded.
    assert dropin.call_path(lambda a, b: (a - b).sum(), x, t)[0] == dropin.FUSED


def _main_quick(tmp_path: Path, monkeypatch, *flags: str) -> dict:
    """``runner.main`` in this process on the CPU (quick sizes, no plots, no overhead stage): the JSON."""
    monkeypatch.setattr(runner.gc, "freeze", lambda: None)
    argv = ["--quick", "--device", "cpu", "--no-plots", "--no-overhead", "--modes", "full", "--out", str(tmp_path)]
    assert runner.main([*argv, *flags]) == 0
    (json_path,) = tmp_path.glob("*.json")
    return json.loads(json_path.read_text())


def test_a_delegated_call_is_labelled_and_never_reported_as_ours(tmp_path, monkeypatch):
    # Our class handing the call to the library's code: its row says so everywhere and gets no
    # speed-up; the library's row and our reference row are measured as usual.
    def ours_delegating(self, backend):
        return _LibraryDice()

    monkeypatch.setattr(dropin.DropIn, "ours", ours_delegating)
    data = _main_quick(tmp_path, monkeypatch, "--losses", "monai_dice_ce", "--providers", "eager,cpu")
    rows = {row["provider"]: row for row in data["rows"]}
    assert set(rows) == {"eager", "cpu"}
    for provider, row in rows.items():
        assert row["path"] == "delegated"
        assert row["vs_eager"] is None and row["vs_library"] is None
        assert "_LibraryDice ran" in data["delegated"][f"monai_dice_ce {provider}"]
    text = next(tmp_path.glob("*.md")).read_text()
    assert "| cpu [delegated] |" in text and "| eager [delegated] |" in text
    with open(next(tmp_path.glob("*.csv"))) as f:
        assert {row["path"] for row in csv.DictReader(f)} == {"delegated"}


def test_speedups_over_the_library_skip_delegated_rows():
    def row(provider, path, ms, loss="monai_dice_ce"):
        key = dict(loss=loss, shape="2x4x8x8x8", dtype="fp32", target="u8 labels", mode="full")
        return {**key, "provider": provider, "path": path, "median_ms": ms}

    rows = [
        row("eager", "reference", 8.0),
        row("compile", "compiled", 4.0),
        row("monai", "library", 6.0),
        row("cpu", "fused", 2.0),
        row("cuda", "delegated", 6.0),
        row("monai", "library", 3.0, loss="ufl_asym"),  # MONAI's closest loss: a different function
        row("cpu", "fused", 1.0, loss="ufl_asym"),
    ]
    runner.add_speedups(rows)
    cpu, cuda, closest = rows[3], rows[4], rows[6]
    assert (cpu["vs_eager"], cpu["vs_compile"], cpu["vs_library"]) == (4.0, 2.0, 3.0)
    assert rows[2]["vs_library"] == 1.0
    assert all(math.isnan(cuda[k]) for k in ("vs_eager", "vs_compile", "vs_library"))
    assert math.isnan(closest["vs_library"])


def test_library_absent_rows_skip_with_a_note_and_ours_still_run(tmp_path, monkeypatch):
    # As on the GPU machine: neither MONAI nor nnU-Net importable. The library rows are not run
    # (a note says why), a fused class of ours is still measured, and one that would delegate is
    # not run rather than reported.
    for name in ("monai", "monai.losses", "nnunetv2", "nnunetv2.training.loss.compound_losses"):
        monkeypatch.setitem(sys.modules, name, None)
    losses = "monai_dice_ce,monai_dice_sigmoid,nnunet_dc_ce"
    providers = "eager,compile,monai,nnunet,cpu"
    data = _main_quick(tmp_path, monkeypatch, "--losses", losses, "--providers", providers)
    by_key = {(row["loss"], row["provider"]): row for row in data["rows"]}
    assert not [key for key in by_key if key[1] in ("monai", "nnunet", "compile")]
    for loss in ("monai_dice_ce", "nnunet_dc_ce"):  # fused today, and they need no library
        assert by_key[(loss, "cpu")]["path"] == "fused" and by_key[(loss, "eager")]["path"] == "reference"
        assert by_key[(loss, "cpu")]["vs_library"] is None
    notes = {(entry["loss"], entry["provider"]): entry["reason"] for entry in data["not_run"]}
    for loss, provider in [(loss, p) for loss in losses.split(",") for p in ("compile", "monai", "nnunet")]:
        library = WORKLOADS[loss].dropin
        if provider in ("monai", "nnunet") and provider != library.provider:
            assert (loss, provider) not in notes  # not applicable: no note either
        else:
            assert f"{library.library} is not installed" in notes[(loss, provider)]
    # The sigmoid Dice is fused, so it needs no library: a row on our reference backend and the kernels.
    for provider, path in (("eager", "reference"), ("cpu", "fused")):
        key = ("monai_dice_sigmoid", provider)
        assert key not in notes
        assert by_key[key]["path"] == path
    assert data["delegated"] == {}


def test_overhead_summary_keeps_the_worst_criterion_of_each_path_and_mode():
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    rows = []
    for path in ("cpu", "triton (launch stubbed)"):
        for mode in ("train", "no_grad"):
            for loss in ("LMFLoss", "DiceLoss", "FocalLoss"):
                us, ce = (float(v) for v in 1 + 100 * torch.rand(2, generator=gen))
                rows.append(dict(loss=loss, path=path, mode=mode, input="rows", us=us, ce_us=ce, ratio=us / ce))
    summary = overhead_stage.summary(rows)
    assert len(summary) == 4
    for line in summary:
        group = [r for r in rows if (r["path"], r["mode"]) == (line["path"], line["mode"])]
        worst = max(group, key=lambda r: r["ratio"])
        assert (line["worst_loss"], line["ratio"]) == (worst["loss"], worst["ratio"])
        assert line["meets_goal"] == (worst["ratio"] <= overhead_stage.GOAL)
    stage = {"calls": 3, "rows": rows, "construction": [], "table": "# title\n\nbody\n", "summary": summary}
    text = "\n".join(overhead_stage.lines(stage))
    assert "## title" in text and "body" in text and text.count("\n| cpu |") == 2
    assert overhead_stage.lines({"calls": 3, "error": "exit 1: boom"}) == [
        "Per-call overhead: not measured (exit 1: boom)"
    ]


def test_overhead_stage_runs_bench_overhead_in_a_child_process():
    # The stage hands back bench.overhead's own rows: every criterion, path and mode, with the
    # ratio to cross-entropy that its table prints.
    stage = overhead_stage.measure(2, torch.device("cpu"), 1, timeout_s=600)
    assert "error" not in stage, stage.get("error")
    losses = {*overhead.ROW_LOSSES, *overhead.DENSE_LOSSES}
    paths = {label for label, _, _ in overhead.paths(torch.device("cpu"))}
    assert {(r["loss"], r["path"], r["mode"]) for r in stage["rows"]} == {
        (loss, path, mode) for loss in losses for path in paths for mode in ("train", "no_grad")
    }
    for r in stage["rows"]:
        assert r["us"] > 0 and r["ce_us"] > 0 and r["ratio"] == pytest.approx(r["us"] / r["ce_us"])
        assert f"| {r['loss']} | {r['path']} | {r['mode']} | {r['us']:.1f} |" in stage["table"]
    assert {name for name, _ in stage["construction"]} == set(overhead.CONSTRUCTED)
    assert len(stage["summary"]) == len(paths) * 2


@pytest.mark.parametrize(
    ("returncode", "stdout", "expected"),
    [(3, "", "exit 3: boom"), (0, "not json\n", "unreadable output"), (0, '{"rows": [{"loss": "L"}]}\n', "KeyError")],
)
def test_a_failing_overhead_child_leaves_a_note(monkeypatch, returncode, stdout, expected):
    # A crash or an output of another form (bench.overhead changed) must not end the suite's run.
    def fake_run(command, **kwargs):
        return subprocess.CompletedProcess(command, returncode, stdout=stdout, stderr="boom")

    monkeypatch.setattr(overhead_stage.subprocess, "run", fake_run)
    stage = overhead_stage.measure(7, torch.device("cpu"), 1)
    assert set(stage) == {"calls", "error"} and stage["calls"] == 7 and expected in stage["error"]
    assert overhead_stage.lines(stage)[0].startswith("Per-call overhead: not measured (")
