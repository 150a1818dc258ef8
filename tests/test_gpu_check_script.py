"""``scripts/gpu_check.sh`` cannot lose a GPU session's results: its dry mode, run here without a GPU.

The dry mode runs every step in a trivial form; the archive must come out complete after a clean
run, after a step that fails or times out, and after a signal in the middle of a step. The GPU
mode's limits must fit one device command (under 500 s). ``bench/traffic.py``'s reading of Nsight
Compute's CSV is checked on a CSV in ncu's layout.
"""

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from bench import traffic
from bench.workloads import WORKLOADS, bytes_moved, logits_shape

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = (
    "versions",
    "build",
    "gpu_tests",
    "triton_tests",
    "traffic",
    "ncu",
    "bench_headline",
    "bench_sweep",
    "bench_dropin",
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a bash script with GNU timeout")


def _env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k != "TRITON_INTERPRET"}
    # The venv's interpreter first on PATH, as `python3` (the script's default).
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.update(OUT=str(tmp_path / "out"), GPU_CHECK_DRY="1", OMP_NUM_THREADS="1", **extra)
    return env


def _archive(tmp_path: Path) -> dict[str, bytes]:
    with tarfile.open(tmp_path / "out" / "gpu_check.tgz") as tar:
        return {m.name.removeprefix("./"): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _summary(files: dict[str, bytes]) -> dict[str, dict]:
    rows = csv.DictReader(io.StringIO(files["summary.tsv"].decode()), delimiter="\t")
    return {row["step"]: row for row in rows}


@pytest.mark.slow  # every step in its CPU form: collections, benchmark and traffic runs
def test_dry_run_writes_every_step_into_the_archive(tmp_path):
    done = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.tgz", "summary.tsv", "versions.txt"]
    files = _archive(tmp_path)
    summary = _summary(files)
    assert list(summary) == [*STEPS, "end"]
    assert all(summary[s]["exit"] == "0" for s in (*STEPS, "end")), summary
    versions = files["versions.txt"].decode()
    assert re.search(r"^interpreter .*python3$", versions, re.M), versions
    for key in ("mode dry-run", "CUDA_HOME ", f"torch {torch.__version__}", "commit "):
        assert key in versions, versions
    for step in STEPS:
        assert f"{step}.log" in files
    gpu_test = "tests/test_hardening_numerics.py::test_nonfinite_logits_give_nan_loss_on_gpu"
    assert gpu_test in files["gpu_tests.log"].decode(), "the gpu mark selects it"
    # The benchmark and traffic steps' own results, complete.
    for folder in ("bench_headline", "bench_sweep", "bench_dropin"):
        (name,) = [n for n in files if n.startswith(folder + "/") and n.endswith(".json")]
        data = json.loads(files[name])
        assert data["meta"]["complete"] is True and data["rows"]
        # Only the drop-in step measures the overhead (after its rows): the headline steps skip it.
        assert ("overhead" in data) == (folder == "bench_dropin"), folder
    dropin = json.loads(files[next(n for n in files if n.startswith("bench_dropin/") and n.endswith(".json"))])
    assert {row["loss"] for row in dropin["rows"]} == {"monai_dice_ce", "monai_dice_sigmoid"}
    assert dropin["overhead"]["rows"] and "error" not in dropin["overhead"]
    rows = json.loads(files["traffic.json"])
    assert {row["case"] for row in rows} == set(traffic.CASES)
    assert all(row["copy_fraction"] > 0 for row in rows), rows
    assert json.loads(files["ncu/dram.json"]) == []  # no ncu without a GPU: nothing made up


def test_failing_and_timed_out_steps_still_yield_the_archive(tmp_path):
    steps = "versions,build,gpu_tests,traffic"
    env = _env(tmp_path, GPU_CHECK_STEPS=steps, GPU_CHECK_INJECT="build=fail,gpu_tests=hang")
    begin = time.monotonic()
    done = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    files = _archive(tmp_path)
    summary = _summary(files)
    assert list(summary) == ["versions", "build", "gpu_tests", "traffic", "end"], summary
    assert summary["build"]["exit"] == "1" and summary["build"]["note"] == "injected failure"
    assert summary["gpu_tests"]["exit"] == "124" and "timed out after 2s" in summary["gpu_tests"]["note"]
    assert summary["traffic"]["exit"] == "0", "a failed step must not stop the next ones"
    assert done.returncode == int(summary["end"]["exit"]) == 124
    assert json.loads(files["traffic.json"])
    assert time.monotonic() - begin < 120


def test_a_signal_in_the_middle_of_a_step_still_yields_the_archive(tmp_path):
    env = _env(tmp_path, GPU_CHECK_STEPS="build,gpu_tests,traffic", GPU_CHECK_INJECT="gpu_tests=stall")
    process = subprocess.Popen(
        ["bash", str(SCRIPT)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    summary_path = tmp_path / "out" / "summary.tsv"
    deadline = time.monotonic() + 120
    while not (summary_path.exists() and "\nbuild\t" in summary_path.read_text()):  # written after each step
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
        time.sleep(0.2)
    time.sleep(1.0)  # inside the stalled step now
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 143, output
    summary = _summary(_archive(tmp_path))
    assert list(summary) == ["build", "gpu_tests", "end"], summary
    assert summary["gpu_tests"]["note"] == "interrupted by SIGTERM"
    assert summary["end"]["note"] == "interrupted (SIGTERM)"


def test_interpreter_and_cuda_home_are_found_as_on_the_device(tmp_path):
    # nvcc on PATH is a wrapper script (as on the device image) and there is no /usr/local/cuda:
    # CUDA_HOME must be the toolkit the wrapper execs, not the wrapper's own prefix.
    toolkit = tmp_path / "toolkit"
    (toolkit / "bin").mkdir(parents=True)
    wrapper = tmp_path / "wrapper" / "bin" / "nvcc"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    env = _env(tmp_path, GPU_CHECK_STEPS="versions", GPU_CHECK_CUDA_CANDIDATE=str(tmp_path / "none"))
    env.pop("CUDA_HOME", None)
    env["PATH"] = f"{wrapper.parent}:{env['PATH']}"
    done = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    versions = _archive(tmp_path)["versions.txt"].decode()
    assert f"CUDA_HOME {toolkit} (from the wrapper {wrapper})" in versions, versions

    # No interpreter: a clear message, exit 127, and still an archive that says so.
    env = _env(tmp_path, PYTHON="no-such-python3")
    done = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 127
    files = _archive(tmp_path)
    assert "'no-such-python3' not found" in files["versions.txt"].decode()
    assert _summary(files)["end"]["exit"] == "127"


def test_gpu_mode_limits_fit_one_device_command():
    # The device runs one command for at most 600 s; the steps' limits and the budget that clips
    # them must stay under 500 s together.
    text = SCRIPT.read_text()
    gpu_branch = text.split("\nelse\n")[-1]
    limits = {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s*step (\w+) (\d+) ", gpu_branch, re.M)}
    limits["versions"] = int(re.search(r"^step versions (\d+) ", text, re.M).group(1))
    assert set(limits) == set(STEPS)
    budget = int(re.search(r'budget="\$\{GPU_CHECK_BUDGET:-(\d+)\}"', text).group(1))
    assert sum(limits.values()) < 500 and budget < 500
    assert " -x " not in gpu_branch and "--maxfail=200" in text


NCU_HEADER = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream", "Block Size",
              "Grid Size", "Device", "CC", "Section Name", "Metric Name", "Metric Unit", "Metric Value"]  # fmt: skip


def _ncu_csv(kernels: list[tuple[str, list[tuple[str, str, str]]]]) -> str:
    """Text as ``ncu --csv --log-file`` writes it: progress lines, then one row per kernel and metric."""
    table = io.StringIO()
    writer = csv.writer(table, quoting=csv.QUOTE_ALL, lineterminator="\n")
    writer.writerow(NCU_HEADER)
    for index, (kernel, metrics) in enumerate(kernels):
        for metric, unit, value in metrics:
            launch = [index, 4242, "python3", "127.0.0.1", kernel, 1, 7, "(256, 1, 1)", "(1024, 1, 1)", 0, "9.0"]
            writer.writerow([*launch, "Command line profiler metrics", metric, unit, value])
    return f"==PROF== Connected to process 4242\n{table.getvalue()}==PROF== Disconnected from process 4242\n"


def test_ncu_csv_is_summed_per_case_against_the_ideal_bytes(tmp_path):
    gen = torch.Generator().manual_seed(int(time.time()))
    r0, r1, w1 = (int(v) for v in torch.randint(1, 10**9, (3,), generator=gen))
    w0_kb, t0_ns, t1_us = 1234.5, 81234.0, 12.5
    read, write, duration = traffic.METRICS
    text = _ncu_csv(
        [
            ("kernel_a", [(read, "byte", f"{r0:,}"), (write, "Kbyte", str(w0_kb)), (duration, "nsecond", str(t0_ns))]),
            ("kernel_b", [(read, "byte", str(r1)), (write, "byte", str(w1)), (duration, "usecond", str(t1_us))]),
        ]
    )
    kernels = traffic.parse_ncu_csv(text)
    assert [k["kernel"] for k in kernels] == ["kernel_a", "kernel_b"]
    assert kernels[0][read] == r0 and kernels[0][write] == w0_kb * 1e3
    assert kernels[1][duration] == pytest.approx(t1_us * 1e-6)

    name = "lmf_rows_bf16_1M"
    (tmp_path / f"ncu_{name}_triton.csv").write_text(text)
    copy_kernel = [(read, "byte", "1"), (write, "byte", "1"), (duration, "nsecond", str(t0_ns / 2))]
    (tmp_path / f"ncu_{name}_copy.csv").write_text(_ncu_csv([("copy", copy_kernel)]))
    rows = traffic.summarize(tmp_path, small=True, out=tmp_path / "dram.json")
    case = traffic.CASES[name]
    workload = WORKLOADS[case.workload]
    x = torch.zeros(logits_shape(workload, case.small, case.classes), dtype=case.dtype)
    ideal = bytes_moved("full", x, torch.zeros(x.shape[0], dtype=torch.int64))
    by_backend = {row["backend"]: row for row in rows}
    assert set(by_backend) == {"copy", "triton"}
    triton = by_backend["triton"]
    assert triton["ideal_bytes"] == ideal
    assert triton["dram_over_ideal"] == pytest.approx((r0 + w0_kb * 1e3 + r1 + w1) / ideal)
    assert triton["kernel_time_us"] == pytest.approx(t0_ns * 1e-3 + t1_us)
    assert triton["copy_fraction"] == pytest.approx((t0_ns / 2 * 1e-9) / (t0_ns * 1e-9 + t1_us * 1e-6))
    assert json.loads((tmp_path / "dram.json").read_text()) == rows
