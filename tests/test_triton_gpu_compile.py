"""The Triton kernels compile for real GPUs (sm_90, and sm_80 for one), also on a machine without one.

The interpreter runs the kernels' Python with numpy semantics, so a kernel that passes there can
still fail Triton's compiler (types, layouts, unsupported ops). Triton can compile ahead of
time for a named target with its bundled ``ptxas`` and no GPU; this test does that for every
kernel over a set of constexpr variants that switches each flag both ways. It runs in a
subprocess because this test session imports triton in interpreter mode.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lmfloss_kernels.triton import region, row

    FLOATS = {"alpha", "beta", "gamma", "s", "eps", "delta", "smooth_nr", "smooth_dr", "focal_coef", "tversky_coef",
              "one_minus_eps", "log_eps", "log_one_minus_eps"}

    def compile_variant(kernel, pointers, constexprs, arch, index_type="i32"):
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = pointers.get(name, "*fp32")
            else:
                signature[name] = "fp32" if name in FLOATS else index_type
        source = ASTSource(kernel, signature, constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})
        assert "ld.global" in compiled.asm["ptx"] and "st.global" in compiled.asm["ptx"]

    count = 0
    # Every variant for sm_90 (H100 / H200); the A100 generation gets the heaviest one, below.
    for arch in (90,):
        for mean in (False, True):
            constexprs = dict(HAS_LDAM=True, HAS_FOCAL=not mean, MEAN=mean, BLOCK_P=256)
            compile_variant(row._row_total_kernel, {}, constexprs, arch)
            count += 1
        # (logits, labels, flags): bf16 class-last rows of 8 (the 128-bit path), float16 5 classes
        # strided, float32 dense 14 classes.
        row_variants = [
            ("*bf16", "*i64", dict(C=8, CLASS_LAST=True, HAS_LDAM=True, HAS_FOCAL=True, MEAN=True, PER_ROW=False,
                                   BLOCK_C=8, BLOCK_V=1024)),
            ("*fp16", "*u8", dict(C=5, CLASS_LAST=False, HAS_LDAM=True, HAS_FOCAL=False, MEAN=False, PER_ROW=True,
                                  BLOCK_C=8, BLOCK_V=512)),
            ("*fp32", "*i32", dict(C=14, CLASS_LAST=False, HAS_LDAM=False, HAS_FOCAL=True, MEAN=False, PER_ROW=False,
                                   BLOCK_C=16, BLOCK_V=512)),
        ]
        for logits, labels, flags in row_variants:
            pointers = {"logit_ptr": logits, "label_ptr": labels, "grad_ptr": logits}
            forward_flags = {k: v for k, v in flags.items() if k != "MEAN"}
            compile_variant(row._row_forward_kernel, pointers, forward_flags, arch, "i64")
            compile_variant(row._row_backward_kernel, pointers, flags, arch, "i64")
            count += 2
        # Softmax: u8 labels, fp32 soft map, i64 labels, u8 one-hot; sigmoid: u8 multi-hot (binary),
        # fp32 soft map, i32 labels with ignore.
        softmax = dict(SIGMOID=False, BINARY=False)
        sigmoid = dict(SIGMOID=True, BINARY=True)
        region_variants = [
            ("*bf16", "*u8", dict(softmax, DENSE=False, HAS_IGNORE=True, CLIP=True, HAS_FOCAL=True, HAS_TVERSKY=True)),
            ("*fp16", "*fp32", dict(softmax, DENSE=True, HAS_IGNORE=False, CLIP=False, HAS_FOCAL=True,
                                    HAS_TVERSKY=False)),
            ("*fp32", "*i64", dict(softmax, DENSE=False, HAS_IGNORE=False, CLIP=True, HAS_FOCAL=False,
                                   HAS_TVERSKY=True)),
            ("*bf16", "*u8", dict(softmax, DENSE=True, HAS_IGNORE=False, CLIP=True, HAS_FOCAL=True, HAS_TVERSKY=True)),
            ("*bf16", "*u8", dict(sigmoid, DENSE=True, HAS_IGNORE=False, CLIP=True, HAS_FOCAL=True, HAS_TVERSKY=True)),
            ("*fp32", "*fp32", dict(sigmoid, BINARY=False, DENSE=True, HAS_IGNORE=False, CLIP=False, HAS_FOCAL=True,
                                    HAS_TVERSKY=True)),
            ("*fp16", "*i32", dict(sigmoid, DENSE=False, HAS_IGNORE=True, CLIP=True, HAS_FOCAL=False,
                                   HAS_TVERSKY=True)),
        ]
        for logits, target, flags in region_variants:
            pointers = {"logit_ptr": logits, "target_ptr": target, "grad_ptr": logits}
            for backward in (False, True):
                constexprs = dict(flags, BACKWARD=backward, C=5, BLOCK_C=8, ROWS=256, VEC=4)
                compile_variant(region._region_kernel, pointers, constexprs, arch)
                count += 1
    pointers = {"logit_ptr": "*bf16", "target_ptr": "*u8", "grad_ptr": "*bf16"}
    flags = dict(DENSE=False, SIGMOID=False, BINARY=False, HAS_IGNORE=True, CLIP=True, HAS_FOCAL=True,
                 HAS_TVERSKY=True, BACKWARD=True)
    compile_variant(region._region_kernel, pointers, dict(flags, C=4, BLOCK_C=4, ROWS=128, VEC=8), 80)
    count += 1
    finalize_variants = [
        dict(BATCH=False, HAS_FOCAL=True, HAS_TVERSKY=True, REDUCTION=2),
        dict(BATCH=True, HAS_FOCAL=True, HAS_TVERSKY=True, REDUCTION=0),
        dict(BATCH=True, HAS_FOCAL=False, HAS_TVERSKY=True, REDUCTION=1),
        dict(BATCH=False, HAS_FOCAL=True, HAS_TVERSKY=False, REDUCTION=0),
    ]
    for flags in finalize_variants:
        for backward in (False, True):
            constexprs = dict(flags, BACKWARD=backward, BLOCK_B=4, BLOCK_C=8)
            compile_variant(region._finalize_kernel, {}, constexprs, 90)
            count += 1
    print("compiled", count)
    """
)


@pytest.mark.slow
def test_kernels_compile_for_gpus():
    triton = pytest.importorskip("triton")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip(f"Triton's bundled ptxas is missing ({ptxas}); ahead-of-time GPU compilation is impossible")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled 31" in result.stdout
