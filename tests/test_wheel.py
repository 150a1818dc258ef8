"""Wheels: scripts/build_wheel.sh builds them, scripts/check_wheel.py checks them.

Fast tests give the checker's parts inputs whose answer is known (hand-made wheels with one
defect each, a stand-in cuobjdump, the ELF reader against readelf). The slow tests are CI's
smallest useful scope of the real thing: a CPU-only wheel and a CUDA wheel for one architecture
built from the sources, each checked in a fresh venv, and each refused when asked for a target it
lacks. The release build (four architectures, about seven minutes on two cores) is not run here;
see the README's "Building wheels".

The CUDA wheel is also CI's CUDA build gate, on a machine without a GPU: its kernels must compile
and link, and the checker loads the library in a fresh venv and requires CUDA kernels for every
op. It is built for sm_80, the oldest architecture the package supports (code that needs a newer
one fails there; the sources have no per-architecture branches, and the GPU check compiles for the
device itself), with compute_80 PTX for newer GPUs. Every architecture is a full device compile,
minutes on a loaded 2-core machine, so the gate and the wheel share this one build.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from toolchain import cuda_home

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_wheel", ROOT / "scripts" / "check_wheel.py")
check_wheel = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_wheel)

TORCH_MM = ".".join(torch.__version__.split("+")[0].split(".")[:2])


def _info(**overrides) -> dict:
    info = {"version": f"0.1.0+cu130torch{TORCH_MM}", "torch": torch.__version__, "torch_cuda": "13.0"}
    info.update(with_cuda=True, cuda_arch_list="9.0+PTX")
    return {**info, **overrides}


def _fake_wheel(
    path: Path, version: str, info: dict | None, extra: tuple[str, ...] = (), requires: str = f"torch=={TORCH_MM}.*"
) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(
            f"lmfloss_kernels-{version}.dist-info/METADATA",
            f"Name: lmfloss-kernels\nVersion: {version}\nRequires-Dist: {requires}\n",
        )
        archive.writestr("lmfloss_kernels/__init__.py", "")
        archive.writestr("lmfloss_kernels/_C.cpython-311-x86_64-linux-gnu.so", b"\x7fELF")
        if info is not None:
            archive.writestr("lmfloss_kernels/_build_info.json", json.dumps(info))
        for name in extra:
            archive.writestr(name, b"\x7fELF")
    return path


def test_arch_list_parsing():
    sass, ptx = check_wheel.parse_arch_list("8.0;8.6;8.9;9.0+PTX")
    assert sass == {"sm_80", "sm_86", "sm_89", "sm_90"} and ptx == {"sm_90"}
    sass, ptx = check_wheel.parse_arch_list(" 7.5+PTX 9.0a  10.0 ")
    assert sass == {"sm_75", "sm_90a", "sm_100"} and ptx == {"sm_75"}
    for bad in ("Hopper", "9", "9.0+ptx", "", " ; "):
        with pytest.raises(ValueError, match="arch list"):
            check_wheel.parse_arch_list(bad)


def test_local_label_names_cuda_and_torch():
    assert check_wheel.expected_label(_info(torch="2.14.1+cu130")) == "cu130torch2.14"
    assert check_wheel.expected_label(_info(torch="2.9.0", torch_cuda="12.8")) == "cu128torch2.9"
    assert check_wheel.expected_label(_info(torch="2.14.1+cu130", with_cuda=False)) == "cputorch2.14"


def test_sound_wheel_contents_pass(tmp_path):
    check = check_wheel.Check()
    version = f"0.1.0+cu130torch{TORCH_MM}"
    _, info, library = check_wheel.read_wheel(_fake_wheel(tmp_path / "a.whl", version, _info()), check)
    assert check.failures == [] and info["cuda_arch_list"] == "9.0+PTX"
    assert library == "lmfloss_kernels/_C.cpython-311-x86_64-linux-gnu.so"


@pytest.mark.parametrize(
    ("version", "info", "extra", "message"),
    [
        ("0.1.0+cu130torch{mm}", _info(), ("torch/lib/libtorch_cpu.so",), "vendors shared libraries"),
        ("0.1.0+cu130torch{mm}", _info(), ("lmfloss_kernels/libc10.so.2",), "vendors shared libraries"),
        ("0.1.0+cu130torch{mm}", _info(), ("lmfloss_kernels/_D.so",), "unexpected binaries"),
        ("0.1.0+cu130torch{mm}", None, (), "no build metadata"),
        ("0.1.0+cu128torch{mm}", _info(version="0.1.0+cu128torch{mm}"), (), "should name the build's CUDA"),
        ("0.1.0+cputorch{mm}", _info(version="0.1.0+cputorch{mm}"), (), "should name the build's CUDA"),
        ("0.1.0", _info(version="0.1.0"), (), "has no local label"),
        ("0.1.0+cu130torch{mm}", _info(version="0.1.0"), (), "metadata version"),
    ],
)
def test_defective_wheel_contents_fail(tmp_path, version, info, extra, message):
    version = version.format(mm=TORCH_MM)
    if info is not None:
        info = dict(info, version=info["version"].format(mm=TORCH_MM))
    check = check_wheel.Check()
    check_wheel.read_wheel(_fake_wheel(tmp_path / "a.whl", version, info, extra), check)
    assert any(message in failure for failure in check.failures), check.failures


@pytest.mark.parametrize("requires", ["torch>=2.4", "torch==1.0.*", "torch"])
def test_wheel_must_require_the_torch_it_was_built_against(tmp_path, requires):
    check = check_wheel.Check()
    wheel = _fake_wheel(tmp_path / "a.whl", f"0.1.0+cu130torch{TORCH_MM}", _info(), requires=requires)
    check_wheel.read_wheel(wheel, check)
    assert check.failures == [
        f"the wheel must require the torch it was built against (torch=={TORCH_MM}.*), requires ['{requires}']"
    ]


def test_two_libraries_fail(tmp_path):
    wheel = _fake_wheel(tmp_path / "a.whl", f"0.1.0+cu130torch{TORCH_MM}", _info(), ("lmfloss_kernels/_C.abi3.so",))
    check = check_wheel.Check()
    _, _, library = check_wheel.read_wheel(wheel, check)
    assert library is None and any("expected one extension library" in f for f in check.failures)


def test_device_targets_parse_cuobjdump_listings(tmp_path):
    # cuobjdump's listing format ("ELF file N: <name>.<index>.sm_XX.cubin"), from a stand-in.
    tool = tmp_path / "cuobjdump"
    tool.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = --list-elf ]; then\n'
        "  echo 'ELF file    1: _C.1.sm_80.cubin'; echo 'ELF file    2: _C.2.sm_90a.cubin'\n"
        "else\n"
        "  echo 'PTX file    1: _C.1.sm_90.ptx'\n"
        "fi\n"
    )
    tool.chmod(0o755)
    assert check_wheel.device_targets(tmp_path / "lib.so", str(tool)) == ({"sm_80", "sm_90a"}, {"sm_90"})
    tool.write_text("#!/bin/sh\necho \"cuobjdump info    : File '$2' does not contain device code\" >&2\nexit 255\n")
    assert check_wheel.device_targets(tmp_path / "lib.so", str(tool)) == (set(), set())
    tool.write_text("#!/bin/sh\necho 'cuobjdump fatal   : Could not open input file' >&2\nexit 1\n")
    with pytest.raises(RuntimeError, match="Could not open"):
        check_wheel.device_targets(tmp_path / "lib.so", str(tool))


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) is not installed")
def test_elf_reader_agrees_with_readelf():
    library = Path(torch.__file__).parent / "lib" / "libtorch_python.so"
    sections, needed = check_wheel.elf_sections_and_needed(library)
    listing = subprocess.run(["readelf", "-W", "-S", "-d", str(library)], capture_output=True, text=True).stdout
    expected_needed = [line.split("[")[1].split("]")[0] for line in listing.splitlines() if "(NEEDED)" in line]
    assert needed == expected_needed and "libtorch_cpu.so" in needed
    names = {match[1] for match in re.finditer(r"^\s*\[\s*[1-9]\d*\]\s+(\S+)", listing, re.MULTILINE)}
    assert sections - {""} == names and ".dynamic" in names
    with pytest.raises(ValueError, match="not a little-endian ELF64"):
        check_wheel.elf_sections_and_needed(Path(__file__))


def _build(tmp_path: Path, *args: str) -> Path:
    env = dict(os.environ, PYTHON=sys.executable)
    # The wheel's CPU kernels default to x86-64-v3; a test machine without AVX2 runs them built for x86-64.
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if platform.machine() == "x86_64" and (" avx2" not in flags or " fma" not in flags):
        env.setdefault("LMFLOSS_CPU_ARCH", "x86-64")
    for name in ("TORCH_CUDA_ARCH_LIST", "FORCE_CUDA", "FORCE_ONLY_CPU", "LMFLOSS_LOCAL_VERSION"):
        env.pop(name, None)
    out = tmp_path / "dist"
    build = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build_wheel.sh"), "--out", str(out), *args],
        env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert build.returncode == 0, f"wheel build failed:\n{build.stdout[-4000:]}\n{build.stderr[-8000:]}"
    (wheel,) = out.glob("lmfloss_kernels-*.whl")
    return wheel


def _check(wheel: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_wheel.py"), str(wheel), *args],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip


@pytest.mark.slow
def test_cpu_wheel_builds_installs_and_is_checked(tmp_path):
    wheel = _build(tmp_path, "--cpu")
    assert wheel.name.startswith(f"lmfloss_kernels-0.1.0+cputorch{TORCH_MM}-")
    result = _check(wheel, "--cpu-only")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SASS     -\nPTX      -" in result.stdout and "kernels for cpu\n" in result.stdout
    assert "unified_focal_loss[cpu]" in result.stdout and "lmf_loss[cpu]" in result.stdout
    refused = _check(wheel, "--arch-list", "9.0")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "missing SASS targets: ['sm_90']" in refused.stdout and "metadata with_cuda=False" in refused.stdout


@pytest.mark.slow
@pytest.mark.skipif(torch.version.cuda is None, reason="this torch is a CPU build: CUDA kernels cannot be compiled")
@pytest.mark.skipif(cuda_home() is None, reason="no CUDA toolkit (CUDA_HOME or nvcc)")
def test_cuda_wheel_for_the_oldest_architecture_builds_loads_and_is_checked(tmp_path):
    wheel = _build(tmp_path, "--arch-list", "8.0+PTX")
    assert wheel.name.startswith(f"lmfloss_kernels-0.1.0+cu{torch.version.cuda.replace('.', '')}torch{TORCH_MM}-")
    result = _check(wheel, "--arch-list", "8.0+PTX")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SASS     sm_80\nPTX      sm_80" in result.stdout and "kernels for cpu, cuda" in result.stdout
    refused = _check(wheel, "--arch-list", "8.0;9.0+PTX")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "missing SASS targets: ['sm_90']" in refused.stdout


def test_unreadable_wheel_and_bad_arch_list_are_reported(tmp_path, capsys):
    bad = tmp_path / "lmfloss_kernels-0.1.0-cp311-cp311-linux_x86_64.whl"
    bad.write_text("not a zip archive")
    assert check_wheel.main([str(bad), "--cpu-only"]) == 1
    assert "FAILED" in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage:
        check_wheel.main([str(bad), "--arch-list", "Hopper"])
    assert usage.value.code == 2 and "arch list: expected entries like" in capsys.readouterr().err
