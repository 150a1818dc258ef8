"""The CALF Triton kernels compile for a Hopper GPU (PTX and cubin), also on a machine without one.

The interpreter runs the kernels as numpy code, so it cannot catch what only the GPU compiler
rejects (types of scalar arguments, constexpr control flow, layouts). Ahead-of-time compilation
for ``sm_90`` needs no device; it runs in a subprocess because ``TRITON_INTERPRET=1`` (set by
conftest on CPU-only machines) replaces ``triton.jit`` functions by interpreted ones.
"""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lmfloss_kernels.calf import _triton as K

target = GPUTarget("cuda", 90, 32)
pointers = {"z_ptr": "*bf16", "partial_ptr": "*fp64", "grad_ptr": "*bf16", "stats_ptr": "*fp64", "g_ptr": "*fp32"}
scalars = {"num_voxels": "i64", "z_batch_stride": "i64", "z_voxel_stride": "i64", "y_batch_stride": "i64",
           "y_voxel_stride": "i64", "g_stride": "i64", "programs_per_image": "i32", "tiles_per_program": "i32",
           "num_images": "i32", "ignore_index": "i32", "limit": "fp32", "transform_coef": "fp32",
           "loss_scale": "fp32", "dice_coef": "fp32", "smooth_nr": "fp32", "smooth_dr": "fp32"}
for transform in range(5):
    for backward in (False, True):
        soft = transform % 2 == 1
        const = {"TRANSFORM": transform, "HAS_TRANSFORM": transform != 1 or backward, "HAS_DICE": True,
                 "SOFT_TARGET": soft, "HAS_IGNORE": not soft, "BATCH": transform == 2, "BACKWARD": backward,
                 "BLOCK": 4096, "BLOCK_B": 4}
        signature = {**pointers, "y_ptr": "*fp16" if soft else "*u8", **scalars, **{k: "constexpr" for k in const}}
        source = ASTSource(fn=K._calf_voxel_kernel, signature=signature, constexprs=const)
        assert triton.compile(source, target=target, options={"num_warps": 8}).asm["cubin"]
# A GPU launch specialises integer arguments equal to 1 into constants: one voxel per image, one image,
# one program per image of one tile, unit strides.
ones = {"num_voxels": 1, "z_voxel_stride": 1, "y_voxel_stride": 1, "programs_per_image": 1, "tiles_per_program": 1,
        "num_images": 1}
for backward in (False, True):
    const = {**ones, "TRANSFORM": 2, "HAS_TRANSFORM": True, "HAS_DICE": True, "SOFT_TARGET": False,
             "HAS_IGNORE": True, "BATCH": True, "BACKWARD": backward, "BLOCK": 128, "BLOCK_B": 1}
    signature = {**pointers, "y_ptr": "*u8", **{k: v for k, v in scalars.items() if k not in ones},
                 **{k: "constexpr" for k in const}}
    source = ASTSource(fn=K._calf_voxel_kernel, signature=signature, constexprs=const)
    assert triton.compile(source, target=target, options={"num_warps": 1}).asm["cubin"]
for batch in (False, True):
    const = {"HAS_DICE": True, "SOFT_TARGET": batch, "HAS_IGNORE": not batch, "BATCH": batch, "BLOCK_B": 4,
             "BLOCK_P": 64}
    signature = {"partial_ptr": "*fp64", "stats_ptr": "*fp64", "loss_ptr": "*fp32", "num_images": "i32",
                 "programs_per_image": "i32", "num_voxels": "i64", "transform_coef": "fp32", "loss_scale": "fp32",
                 "dice_coef": "fp32", "smooth_nr": "fp32", "smooth_dr": "fp32", **{k: "constexpr" for k in const}}
    source = ASTSource(fn=K._finalize_kernel, signature=signature, constexprs=const)
    assert triton.compile(source, target=target, options={"num_warps": 4}).asm["cubin"]
const = {"NUM_CLASSES": 40, "CLASS_BLOCK": 32, "PADDED_CLASSES": 64, "HAS_IGNORE": True, "BLOCK": 512}
signature = {"label_ptr": "*i64", "partial_ptr": "*i32", "num_voxels": "i64", "batch_stride": "i64",
             "tiles_per_image": "i64", "ignore_index": "i32", **{k: "constexpr" for k in const}}
assert triton.compile(ASTSource(fn=K._count_kernel, signature=signature, constexprs=const), target=target).asm["cubin"]
print("compiled")
"""


def test_kernels_compile_for_sm90():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]
