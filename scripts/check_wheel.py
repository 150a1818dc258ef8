#!/usr/bin/env python3
"""Checks a built lmfloss-kernels wheel before it is shipped.

    python scripts/check_wheel.py dist/lmfloss_kernels-0.1.0+cu130torch2.14-*.whl --arch-list "8.0;8.6;8.9;9.0+PTX"
    python scripts/check_wheel.py dist/lmfloss_kernels-0.1.0+cputorch2.14-*.whl --cpu-only

What it checks, failing (exit status 1, every failure listed) when any of it does not hold:

1. Contents: exactly one extension library ``lmfloss_kernels/_C*.so``, no vendored shared
   library (no ``libtorch*``, ``libc10*``, ``libcudart*``: the wheel links against the installed
   torch), the build metadata ``lmfloss_kernels/_build_info.json``, and a local version label that
   names the CUDA and torch of that metadata (``+cu130torch2.14``, ``+cputorch2.14``, optionally
   followed by more dot-separated parts), and a requirement on exactly that torch major.minor
   (``Requires-Dist: torch==2.14.*``).
2. Device code of the library, read from its ELF file: the CUDA fat binary section and the
   libraries it needs; with ``cuobjdump``, the embedded SASS (``--list-elf``) and PTX
   (``--list-ptx``) targets. Every requested target must be present
   (``--arch-list`` in ``TORCH_CUDA_ARCH_LIST`` syntax: ``9.0+PTX`` asks for SASS sm_90 and PTX
   compute_90); a CPU-only wheel (``--cpu-only``) must have no device code and need no CUDA
   library. Without either option, the arch list recorded in the wheel's metadata is requested.
   cuobjdump is the one named by ``--cuobjdump``, else ``$CUDA_HOME/bin/cuobjdump``, else one on
   ``PATH``, else one of the ``nvidia-cuda-cuobjdump`` package or of Triton in this interpreter's
   site-packages, else that package is installed into the check's venv.
3. Installation: a fresh venv (no system site-packages) gets the wheel with ``--no-deps``, then
   imports it from outside the source tree, prints its build metadata, checks that the library
   loaded with kernels for the expected devices, and compares one Unified Focal (label map) and one
   LMF (rows) loss and gradient in float64 with the eager reference on every device it can use
   (the GPU too, where there is one).

torch for the venv (``--torch``): ``borrow`` (default) puts the site-packages of the checking
interpreter's torch on the venv's path after the wheel is installed (seconds, no 5 GB copy; the
venv's own site-packages come first, so ``lmfloss_kernels`` is the wheel's); ``install`` runs
``pip install torch==<the version in the wheel's metadata>`` in the venv (fully isolated, about a
minute from a local cache, several GB of disk).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "lmfloss_kernels"
FATBIN_SECTIONS = (".nv_fatbin", "__nv_relfatbin")
CUDA_LIBRARIES = re.compile(r"^lib(cudart|cuda|c10_cuda|torch_cuda)[.-]")
VENDORED = re.compile(r"(^|/)lib[^/]*\.so(\.\d+)*$")
# Ops with CPU kernels only, by design: CALF's CUDA path is Triton (lmfloss_kernels/calf/_triton.py).
CPU_ONLY_OPS = frozenset({"calf_transform_forward", "calf_transform_backward", "calf_foreground_sizes"})

SMOKE = r"""
import importlib.metadata, json, sys, warnings
import torch
warnings.simplefilter("ignore", RuntimeWarning)  # the load failure, if any, is reported below
import lmfloss_kernels
from lmfloss_kernels import ext, functional as F

report = {
    "python": sys.version.split()[0],
    "torch": torch.__version__,
    "package_file": lmfloss_kernels.__file__,
    "distribution_version": importlib.metadata.version("lmfloss-kernels"),
    "build_info": ext.BUILD_INFO,
    "load_error": ext.LOAD_ERROR,
    "kernel_devices": sorted(ext.KERNEL_DEVICES),
    "op_kernels": {
        op: [key for key in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(op, key)]
        for op in sorted(s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith("lmfloss_ext::"))
    },
    "cuda_available": torch.cuda.is_available(),
    "compared": {},
}
devices = [d for d in report["kernel_devices"] if d == "cpu" or torch.cuda.is_available()]
for device in devices:
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(2, 3, 5, 6, 7, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 5, 6, 7), generator=gen).to(torch.uint8)
    rows = torch.randn(37, 5, generator=gen, dtype=torch.float64) * 3
    row_labels = torch.randint(0, 5, (37,), generator=gen)
    cases = {
        "unified_focal_loss": (dense, lambda x, b: F.unified_focal_loss(x, labels.to(device), backend=b)),
        "lmf_loss": (rows, lambda x, b: F.lmf_loss(x, row_labels.to(device), [50, 20, 9, 4, 1], backend=b)),
    }
    for name, (data, loss) in cases.items():
        results = []
        for backend in (device, "reference"):
            x = data.to(device).requires_grad_()
            value = loss(x, backend)
            (grad,) = torch.autograd.grad(value, x)
            results.append((value.detach().cpu(), grad.cpu()))
        (value, grad), (ref_value, ref_grad) = results
        report["compared"][f"{name}[{device}]"] = {
            "loss": float(value),
            "loss_rel_error": float((value - ref_value).abs() / ref_value.abs().clamp_min(1e-300)),
            "grad_rel_error": float((grad - ref_grad).norm() / ref_grad.norm().clamp_min(1e-300)),
        }
print("REPORT " + json.dumps(report))
"""


class Check:
    """The failures found in one wheel."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def require(self, condition: bool, message: str) -> bool:
        if not condition:
            self.failures.append(message)
        return condition


def parse_arch_list(arch_list: str) -> tuple[set[str], set[str]]:
    """(SASS, PTX) targets of a TORCH_CUDA_ARCH_LIST: ``"8.0;9.0+PTX"`` -> ({sm_80, sm_90}, {sm_90})."""
    sass, ptx = set(), set()
    for item in re.split(r"[;\s]+", arch_list.strip()):
        if not item:
            continue
        match = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", item)
        if match is None:
            raise ValueError(f"arch list: expected entries like '8.6' or '9.0+PTX' or '9.0a', got {item!r}")
        name = f"sm_{match[1]}{match[2]}{match[3]}"
        sass.add(name)
        if match[4]:
            ptx.add(name)
    if not sass:
        raise ValueError(f"arch list: expected at least one architecture, got {arch_list!r}")
    return sass, ptx


def expected_label(info: dict) -> str:
    """The local version label build_wheel.sh gives a wheel with this build metadata."""
    torch_mm = ".".join(info["torch"].split("+")[0].split(".")[:2])
    if info.get("with_cuda"):
        return f"cu{info['torch_cuda'].replace('.', '')}torch{torch_mm}"
    return f"cputorch{torch_mm}"


def read_wheel(wheel: Path, check: Check) -> tuple[str | None, dict | None, str | None]:
    """(version, build metadata, library member) of the wheel; contents problems go to ``check``."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        libraries = [n for n in names if re.fullmatch(rf"{PACKAGE}/_C[^/]*\.so", n)]
        check.require(len(libraries) == 1, f"expected one extension library {PACKAGE}/_C*.so, found {libraries}")
        vendored = [n for n in names if VENDORED.search(n)]
        check.require(not vendored, f"the wheel vendors shared libraries (torch's must come from torch): {vendored}")
        other_binaries = [n for n in names if n.endswith(".so") and n not in libraries and n not in vendored]
        check.require(not other_binaries, f"unexpected binaries in the wheel: {other_binaries}")
        info = None
        if check.require(f"{PACKAGE}/_build_info.json" in names, f"no build metadata {PACKAGE}/_build_info.json"):
            info = json.loads(archive.read(f"{PACKAGE}/_build_info.json"))
        metadata = [n for n in names if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        version = None
        if check.require(len(metadata) == 1, f"expected one .dist-info/METADATA, found {metadata}"):
            text = archive.read(metadata[0]).decode()
            version = re.search(r"^Version: (.+)$", text, re.MULTILINE)[1].strip()
            requires = re.findall(r"^Requires-Dist: (torch\b.*)$", text, re.MULTILINE)
            if info is not None:
                pin = "torch==" + ".".join(info.get("torch", "?").split("+")[0].split(".")[:2]) + ".*"
                check.require(
                    [r.strip() for r in requires] == [pin],
                    f"the wheel must require the torch it was built against ({pin}), requires {requires}",
                )
    if info is not None and version is not None:
        label = version.partition("+")[2]
        check.require(
            label == expected_label(info) or label.startswith(expected_label(info) + "."),
            f"version {version}: the local label should name the build's CUDA and torch, "
            f"'+{expected_label(info)}', got '+{label}'"
            if label
            else f"version {version} has no local label",
        )
        check.require(info.get("version") == version, f"metadata version {info.get('version')} != wheel {version}")
    return version, info, libraries[0] if len(libraries) == 1 else None


def elf_sections_and_needed(path: Path) -> tuple[set[str], list[str]]:
    """Section names and DT_NEEDED libraries of a little-endian ELF64 shared library."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path}: not a little-endian ELF64 file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]

    def string(table: int, offset: int) -> str:
        start = headers[table][4] + offset
        return data[start : data.index(b"\0", start)].decode()

    sections = {string(shstrndx, header[0]) for header in headers}
    needed = []
    for header in headers:
        if header[1] == 6:  # SHT_DYNAMIC: (tag, value) pairs; DT_NEEDED = 1 names a string of its sh_link table
            for offset in range(header[4], header[4] + header[5], 16):
                tag, value = struct.unpack_from("<qQ", data, offset)
                if tag == 1:
                    needed.append(string(header[6], value))
    return sections, needed


def find_cuobjdump(explicit: str | None, venv: Path | None) -> str | None:
    candidates = [explicit] if explicit else []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "cuobjdump"))
    candidates.append(shutil.which("cuobjdump"))
    # The nvidia-cuda-cuobjdump package puts it at site-packages/nvidia/cu<major>/bin; Triton ships
    # one too (triton/backends/nvidia/bin), so a machine with Triton needs no download.
    sites = [Path(entry) for entry in sys.path if entry.endswith("site-packages")]
    if venv is not None:
        sites += sorted(venv.glob("lib/python*/site-packages"))
    for pattern in ("nvidia/*/bin/cuobjdump", "triton/backends/nvidia/bin/cuobjdump"):
        candidates += [str(tool) for site in sites for tool in sorted(site.glob(pattern))]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def device_targets(library: Path, cuobjdump: str) -> tuple[set[str], set[str]]:
    """(SASS, PTX) targets embedded in the library, as cuobjdump lists them."""
    found = []
    for option, kind in (("--list-elf", "cubin"), ("--list-ptx", "ptx")):
        result = subprocess.run([cuobjdump, option, str(library)], capture_output=True, text=True)
        output = result.stdout + result.stderr
        if result.returncode != 0 and "does not contain device code" not in output:
            raise RuntimeError(f"{cuobjdump} {option} failed ({result.returncode}): {output.strip()}")
        found.append(set(re.findall(rf"\.(sm_\d+[af]?)\.{kind}\b", output)))
    return found[0], found[1]


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def make_venv(venv: Path, wheel: Path, torch_mode: str, info: dict | None) -> None:
    """A fresh venv with the wheel installed and torch borrowed or installed."""
    run([sys.executable, "-m", "venv", "--clear", str(venv)])
    python = str(venv_python(venv))
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if torch_mode == "install":
        torch_version = (info or {}).get("torch", "").split("+")[0]
        run([*pip, f"torch=={torch_version}" if torch_version else "torch"])
    run([*pip, "--no-deps", str(wheel)])
    if torch_mode == "borrow":
        import torch

        site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
        # A plain path line: the borrowed directory's own .pth files (an editable install of this
        # package among them) are not run, and it comes after the venv's site-packages.
        Path(site, "_lmfloss_check_borrowed_torch.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")


def check_installed(venv: Path, check: Check, expect_cuda: bool, version: str | None) -> dict | None:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}
    env["PYTHONNOUSERSITE"] = "1"
    with tempfile.TemporaryDirectory() as cwd:  # nowhere near a source tree
        result = subprocess.run(
            [str(venv_python(venv)), "-c", SMOKE], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
        )
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    if not check.require(result.returncode == 0 and lines, f"importing the installed wheel failed:\n{result.stderr}"):
        return None
    report = json.loads(lines[-1][len("REPORT ") :])
    check.require(
        Path(report["package_file"]).resolve().is_relative_to(venv.resolve()),
        f"lmfloss_kernels was imported from {report['package_file']}, not from the venv {venv}",
    )
    check.require(
        report["distribution_version"] == version,
        f"the venv reports lmfloss-kernels {report['distribution_version']}, the wheel is {version}",
    )
    check.require(report["load_error"] is None, f"the extension did not load: {report['load_error']}")
    devices = ["cpu", "cuda"] if expect_cuda else ["cpu"]
    check.require(report["kernel_devices"] == devices, f"kernels for {report['kernel_devices']}, expected {devices}")
    keys = [device.upper() for device in devices]
    check.require(bool(report["op_kernels"]), "no lmfloss_ext operator is registered")
    for op, registered in report["op_kernels"].items():
        expected = ["CPU"] if op.split("::")[-1] in CPU_ONLY_OPS else keys
        check.require(registered == expected, f"{op} has kernels for {registered}, expected {expected}")
    for case, errors in report["compared"].items():
        check.require(
            errors["loss_rel_error"] <= 1e-10 and errors["grad_rel_error"] <= 1e-10,
            f"{case} differs from the reference: {errors}",
        )
    check.require("cpu" in {c.split("[")[1][:-1] for c in report["compared"]}, "no CPU comparison ran")
    return report


def check_wheel(wheel: Path, arch_list: str | None, cpu_only: bool, torch_mode: str, cuobjdump: str | None,
                venv: Path | None) -> Check:  # fmt: skip
    check = Check()
    version, info, library_member = read_wheel(wheel, check)
    print(f"wheel    {wheel.name}\nversion  {version}")
    print("build metadata:\n" + json.dumps(info, indent=2))
    if info is not None and arch_list is None and not cpu_only:
        cpu_only = not info.get("with_cuda")
        arch_list = info.get("cuda_arch_list")
    expect_cuda = not cpu_only
    check.require(not expect_cuda or bool(arch_list), "no targets to check: pass --arch-list or --cpu-only")
    sass, ptx = parse_arch_list(arch_list) if expect_cuda and arch_list else (set(), set())
    if info is not None:
        check.require(bool(info.get("with_cuda")) == expect_cuda, f"metadata with_cuda={info.get('with_cuda')}")
    if library_member is None:
        return check
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        with zipfile.ZipFile(wheel) as archive:
            library = Path(archive.extract(library_member, scratch))
        sections, needed = elf_sections_and_needed(library)
        has_fatbin = any(name in sections for name in FATBIN_SECTIONS)
        cuda_needed = sorted(n for n in needed if CUDA_LIBRARIES.match(n))
        print(f"library  {library_member} ({library.stat().st_size / 2**20:.1f} MiB), needs {', '.join(needed)}")
        check.require(has_fatbin == expect_cuda, f"CUDA fat binary section present: {has_fatbin}")
        check.require(bool(cuda_needed) == expect_cuda, f"CUDA libraries needed: {cuda_needed}")
        venv = venv or scratch / "venv"
        make_venv(venv, wheel, torch_mode, info)
        tool = find_cuobjdump(cuobjdump, venv)
        if tool is None:
            run([str(venv_python(venv)), "-m", "pip", "install", "-q", "nvidia-cuda-cuobjdump"])
            tool = find_cuobjdump(None, venv)
        if check.require(tool is not None, "no cuobjdump (set --cuobjdump or CUDA_HOME)"):
            found_sass, found_ptx = device_targets(library, tool)
            print(f"SASS     {' '.join(sorted(found_sass)) or '-'}\nPTX      {' '.join(sorted(found_ptx)) or '-'}")
            print(f"         (listed by {tool})")
            check.require(sass <= found_sass, f"missing SASS targets: {sorted(sass - found_sass)}")
            check.require(ptx <= found_ptx, f"missing PTX targets: {sorted(ptx - found_ptx)}")
            if cpu_only:
                check.require(not found_sass and not found_ptx, "a CPU-only wheel carries device code")
        report = check_installed(venv, check, expect_cuda, version)
        if report is not None:
            print(f"installed in a fresh venv, imported from {report['package_file']}")
            print(f"loaded with torch {report['torch']}, kernels for {', '.join(report['kernel_devices'])}")
            print(
                f"  {len(report['op_kernels'])} ops: "
                + ", ".join(f"{op} {'+'.join(keys)}" for op, keys in report["op_kernels"].items())
            )
            for case, errors in report["compared"].items():
                print(
                    f"  {case}: loss {errors['loss']:.6g}, relative error vs reference: "
                    f"loss {errors['loss_rel_error']:.1e}, gradient {errors['grad_rel_error']:.1e}"
                )
            if expect_cuda and not report["cuda_available"]:
                print("  (no GPU here: the CUDA kernels were loaded but not run)")
    return check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    parser.add_argument("wheel", type=Path)
    targets = parser.add_mutually_exclusive_group()
    targets.add_argument("--arch-list", help="requested targets, TORCH_CUDA_ARCH_LIST syntax, e.g. '8.0;9.0+PTX'")
    targets.add_argument("--cpu-only", action="store_true", help="expect no CUDA code at all")
    parser.add_argument("--torch", choices=("borrow", "install"), default="borrow", help="torch for the venv")
    parser.add_argument("--cuobjdump", help="path of cuobjdump")
    parser.add_argument("--venv", type=Path, help="keep the check's venv here (default: a temporary one)")
    args = parser.parse_args(argv)
    if not args.wheel.is_file():
        parser.error(f"wheel: no such file {args.wheel}")
    if args.arch_list is not None:
        try:
            parse_arch_list(args.arch_list)  # a malformed list is a usage error, before any work
        except ValueError as error:
            parser.error(str(error))
    try:
        check = check_wheel(args.wheel, args.arch_list, args.cpu_only, args.torch, args.cuobjdump, args.venv)
    except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired, zipfile.BadZipFile) as error:
        print(f"FAILED: {args.wheel.name}\n  - {type(error).__name__}: {error}")
        return 1
    if check.failures:
        print(f"FAILED: {args.wheel.name}", *(f"  - {failure}" for failure in check.failures), sep="\n")
        return 1
    print(f"OK: {args.wheel.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
