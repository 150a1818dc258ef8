"""CALF Triton kernels: programs that loop over several tiles, a partial last tile, strided voxels.

The voxel kernel runs ``P`` programs per image, each over a contiguous run of tiles, the image's
partial last tile masked at the end of the program that owns it, and reads logits and target with
their own voxel stride. Each case first checks that the launch plan really has the shape it is
meant to test (so that a change of the plan cannot make the test pass vacuously), then compares
value and gradient with the reference.
"""

from __future__ import annotations

import pytest
import torch
from test_calf_transforms import DEVICE, _assert_close, _fused_and_reference, _logits

from lmfloss_kernels.calf import _triton

# (batch, voxels): several full tiles per program with a partial last tile; one program per image
# over many tiles without a tail; more programs than images, the last owning only the tail.
BLOCK = 1024
CASES = [(2, 5 * BLOCK + 37), (3, 4 * BLOCK), (1, 6 * BLOCK + 1)]


@pytest.fixture(autouse=True)
def _four_programs(monkeypatch):
    # Tiles of 1024 voxels and four programs in all, under the interpreter and on a GPU alike (there:
    # 2 per SM, 2 SMs; 1024 voxels is the tile of every pass and dtype at most).
    monkeypatch.setattr(_triton, "_MAX_BLOCK", BLOCK)
    monkeypatch.setattr(_triton, "_INTERPRETER_PROGRAMS", 4)
    monkeypatch.setattr(_triton, "_PROGRAMS_PER_SM", 2)
    monkeypatch.setattr(_triton, "_sm_count", lambda device: 2)


def _plan(batch, voxels):
    block, _, per_image, tiles_per_program = _triton._plan(batch, voxels, torch.device(DEVICE), 4)
    return block, per_image, tiles_per_program


def test_cases_cover_the_plans_meant():
    plans = [_plan(*case) for case in CASES]
    tiles = [-(-voxels // block) for (_, voxels), (block, _, _) in zip(CASES, plans, strict=True)]
    assert all(block == BLOCK for block, _, _ in plans)
    assert all(tpp > 1 for _, _, tpp in plans)  # every program loops
    assert CASES[0][1] % plans[0][0] and plans[0][1] * plans[0][2] >= tiles[0] > (plans[0][1] - 1) * plans[0][2]
    assert CASES[1][1] % plans[1][0] == 0
    assert plans[2][1] > 1 and tiles[2] == (plans[2][1] - 1) * plans[2][2] + 1  # the last program: the tail alone


@pytest.mark.parametrize("batch, voxels", CASES)
@pytest.mark.parametrize("transform", ["ln", "fisher", "arcsine"])
@pytest.mark.parametrize("target_kind", ["uint8", "ignore", "soft"])
def test_several_tiles_per_program(batch, voxels, transform, target_kind):
    z = _logits((batch, 1, voxels), torch.float32, spread=3.0)
    ignore_index = None
    if target_kind == "soft":
        target = torch.rand(batch, voxels)
    else:
        target = (torch.rand(batch, voxels) < 0.4).to(torch.uint8)
        if target_kind == "ignore":
            ignore_index = 7
            target[torch.rand(target.shape) < 0.2] = 7
    kwargs = dict(dice_coef=1.0, batch=batch > 1, ignore_index=ignore_index, reduction="none")
    _assert_close(_fused_and_reference(z, target, transform, **kwargs), 1e-5, 1e-5)


@pytest.mark.parametrize("transform", ["ln", "log10", "fisher", "logit"])
@pytest.mark.parametrize("dtype, grad_rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_strided_voxels(transform, dtype, grad_rtol):
    # Every other voxel of a wider map: the (B, V) view has voxel stride 2 (read element-wise, no copy),
    # the target a transposed layout; several tiles per program and a partial tile as well.
    voxels = 2 * BLOCK + 301
    z = _logits((2, 2 * voxels), torch.float32, spread=3.0).to(dtype)[:, ::2]
    target = (torch.rand(voxels, 2) < 0.3).to(torch.uint8).t()
    assert z.reshape(2, -1).stride(1) == 2 and target.reshape(2, -1).stride(1) == 2  # views, not copies
    results = _fused_and_reference(z, target, transform, dtype, dice_coef=0.5, reduction="sum")
    _assert_close(results, 1e-5, grad_rtol)
