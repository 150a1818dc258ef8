"""The CPU kernels' tile loops are vectorised: the built library has packed AVX (ymm) arithmetic in them.

The speed of the ``cpu`` backend rests on GCC vectorising the class and voxel loops of
``csrc/cpu`` (branch-free clip, exp / log in vectorisable form, see ``csrc/cpu/tile.h``); a
small change there (a call the compiler cannot inline, a branch) silently turns them scalar.
This test disassembles the library built for ``x86-64-v3`` and counts packed single-precision
ymm arithmetic in each hot float32 function. It needs the extension built for that level and
``objdump`` (binutils, installed with gcc).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lmfloss_kernels import ext

HOT_FUNCTIONS = (
    r"lmfloss::cpu::softmax_tile<float>\(",
    # <dtype, sigmoid, target, clip>: softmax on a label map, sigmoid on a uint8 multi-hot map, each
    # without the clip (the MONAI / nnU-Net criteria) and with it (the Unified Focal family's default).
    r"region_forward_impl<float, false, lmfloss::cpu::LabelMap<unsigned char>, lmfloss::NoClip>\(",
    r"region_backward_impl<float, false, lmfloss::cpu::LabelMap<unsigned char>, lmfloss::NoClip>\(",
    r"region_forward_impl<float, false, lmfloss::cpu::LabelMap<unsigned char>, lmfloss::ClipBounds<float> >\(",
    r"region_backward_impl<float, false, lmfloss::cpu::LabelMap<unsigned char>, lmfloss::ClipBounds<float> >\(",
    r"region_forward_impl<float, true, lmfloss::cpu::SoftMap<unsigned char>, lmfloss::NoClip>\(",
    r"region_backward_impl<float, true, lmfloss::cpu::SoftMap<unsigned char>, lmfloss::NoClip>\(",
    r"region_forward_impl<float, true, lmfloss::cpu::SoftMap<unsigned char>, lmfloss::ClipBounds<float> >\(",
    r"region_backward_impl<float, true, lmfloss::cpu::SoftMap<unsigned char>, lmfloss::ClipBounds<float> >\(",
    r"row_forward_impl<float, long>\(",
    r"row_backward_impl<float, unsigned char>\(",
    r"row_backward_impl<float, long>\(",
)
PACKED_YMM = re.compile(r"\tv(?:add|sub|mul|div|max|min|blendv|f[n]?m(?:add|sub)\w*)ps\s[^\n]*%ymm")
# A call from a hot function to a function of the loss math (loss_math.h, tile.h's polynomials) or to
# libm: that math then runs one lane at a time (GCC once left focal_modulation out of line: 1.7x slower).
MATH_CALL = re.compile(
    r"call\s+[0-9a-f]+ <[^>]*(?:focal_|exp_nonpos|log_pos|log1p|one_minus_p|sigmoid_|clip_prob|tversky_|atan|"
    r"\b(?:exp|log|pow|expm1)f?(?:@plt)?>)"
)


@pytest.mark.skipif(ext.LOAD_ERROR is not None, reason=f"C++ extension not loaded: {ext.LOAD_ERROR}")
@pytest.mark.skipif(
    ext.BUILD_INFO is None or ext.BUILD_INFO.get("cpu_arch") != "x86-64-v3",
    reason="the CPU kernels were not built for x86-64-v3 (AVX2 / FMA)",
)
@pytest.mark.skipif(shutil.which("objdump") is None, reason="no objdump (binutils)")
def test_hot_cpu_loops_use_packed_avx_arithmetic():
    (library,) = Path(ext.__file__).parents[1].glob("_C*.so")
    listing = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", str(library)], capture_output=True, text=True, check=True
    ).stdout
    functions = [f for f in re.split(r"\n(?=[0-9a-f]+ <)", listing) if "@plt>" not in f.split("\n", 1)[0]]
    for pattern in HOT_FUNCTIONS:
        bodies = [f for f in functions if re.search(pattern, f.split("\n", 1)[0])]
        assert bodies, f"no function matching {pattern} in {library.name}"
        packed = max(len(PACKED_YMM.findall(body)) for body in bodies)
        assert packed >= 16, f"{pattern}: only {packed} packed ymm float instructions, the loops are not vectorised"
        calls = sorted({call for body in bodies for call in MATH_CALL.findall(body)})
        assert not calls, f"{pattern}: calls {calls}, math its loops should have inlined"
