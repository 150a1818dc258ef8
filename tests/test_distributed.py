"""dist_sync=True: two gloo ranks on CPU give the single-process loss of the concatenated batch.

Rank 0 holds image 0, rank 1 images 1 and 2 (unequal slices, so a wrong image count shows).
Every rank's loss must equal the single-process loss and its logit gradient the single-process
gradient's slice, for every backend that runs on CPU.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lmfloss_kernels as lk
from lmfloss_kernels import functional as F

WORLD = 2
SLICES = (slice(0, 1), slice(1, 3))
UPSTREAM = 0.7
LOSSES = {
    "unified": lambda x, t, **kw: F.unified_focal_loss(x, t, **kw),
    "dice": lambda x, t, **kw: F.dice_loss(x, t, **kw),
    "focal_tversky": lambda x, t, **kw: F.focal_tversky_loss(x, t, clip=False, **kw),
    "unified_sigmoid": lambda x, t, **kw: F.unified_focal_loss(x, t, sigmoid=True, **kw),
    "dice_ce_sigmoid": lambda x, t, **kw: F.dice_ce_loss(x, t, sigmoid=True, **kw),
}


def _backends() -> list[str]:
    return [name for name in ("reference", "cpu", "triton") if name in lk.available_backends("cpu")]


def _inputs(soft: bool):
    generator = torch.Generator().manual_seed(7)
    logits = 2.0 * torch.randn(3, 4, 3, 5, 6, generator=generator)
    labels = torch.randint(0, 4, (3, 3, 5, 6), generator=generator)
    if soft:
        return logits, torch.softmax(3.0 * torch.randn(logits.shape, generator=generator), 1), None
    labels[1, 0] = 255  # ignored voxels
    return logits, labels, 255


def _cases():
    for backend in _backends():
        for name in LOSSES:
            for batch in (False, True):
                for reduction in ("mean", "sum", "none"):
                    for soft in (False, True) if name == "unified" else (False,):
                        yield backend, name, batch, reduction, soft


def _run(logits, target, ignore_index, backend, name, batch, reduction, **extra):
    x = logits.detach().clone().requires_grad_(True)
    loss = LOSSES[name](
        x, target, batch=batch, reduction=reduction, ignore_index=ignore_index, backend=backend, **extra
    )
    upstream = torch.full_like(loss, UPSTREAM) if reduction != "none" else torch.linspace(0.5, 1.5, loss.numel())
    loss.backward(upstream)
    return loss.detach(), x.grad


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    torch.set_num_threads(1)
    results = {}
    try:
        for case in _cases():
            backend, name, batch, reduction, soft = case
            logits, target, ignore_index = _inputs(soft)
            part = SLICES[rank]
            results[case] = _run(
                logits[part], target[part], ignore_index, backend, name, batch, reduction, dist_sync=True
            )
        results["ddp"] = _ddp_gradients(SLICES[rank], scale=lk.ddp_scale())
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _ddp_gradients(part: slice, scale: float) -> torch.Tensor:
    """Parameter gradient of a 1x1 convolution trained on the synced loss (DDP when ``scale`` != 1)."""
    torch.manual_seed(3)
    net = torch.nn.Conv3d(4, 4, 1)
    features, target, _ = _inputs(False)
    target = target.clamp_max(3)
    model = torch.nn.parallel.DistributedDataParallel(net) if dist.is_initialized() else net
    criterion = lk.UnifiedFocalLoss(batch=True, dist_sync=dist.is_initialized())
    loss = criterion(model(features[part]), target[part])
    (loss * scale).backward()
    return torch.cat([p.grad.flatten() for p in net.parameters()])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def single_rank_group():
    """A one-rank gloo process group for the duration of a test."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )  # fmt: skip
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("dist"))
    context = mp.start_processes(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two gloo ranks did not finish within 240 s")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: "-".join(map(str, c)))
def test_ranks_equal_single_process(rank_results, case):
    backend, name, batch, reduction, soft = case
    logits, target, ignore_index = _inputs(soft)
    full_loss, full_grad = _run(logits, target, ignore_index, backend, name, batch, reduction)
    if reduction == "none":
        # Per-image upstream weights as each rank used them, so gradients compare for batch=False.
        upstream = torch.cat([torch.linspace(0.5, 1.5, s.stop - s.start) for s in SLICES])
        x = logits.detach().clone().requires_grad_(True)
        loss = LOSSES[name](x, target, batch=batch, reduction="none", ignore_index=ignore_index, backend=backend)
        loss.backward(upstream)
        full_grad = x.grad
    for rank, part in enumerate(SLICES):
        loss, grad = rank_results[rank][case]
        expected = full_loss[part] if reduction == "none" else full_loss
        torch.testing.assert_close(loss, expected, rtol=2e-6, atol=1e-7)
        if reduction == "none" and batch:
            continue  # "none" holds the other ranks' images fixed: not a slice of the global gradient
        scale = full_grad.abs().max()
        torch.testing.assert_close(grad / scale, full_grad[part] / scale, rtol=0, atol=2e-6)


def test_batch_none_gradient_holds_other_ranks_fixed(rank_results):
    """reduction="none", batch=True: the rank's gradient is that of its own outputs, the others' sums constant."""
    backend, name = "reference", "unified"
    logits, target, ignore_index = _inputs(False)
    grads = []
    for part in SLICES:
        x = logits.detach().clone().requires_grad_(True)
        others = torch.ones(3, dtype=torch.bool)
        others[part] = False
        # The others' images enter only through their statistics: detach them.
        mixed = torch.where(others.view(3, 1, 1, 1, 1), x.detach(), x)
        loss = LOSSES[name](mixed, target, batch=True, reduction="none", ignore_index=ignore_index, backend=backend)
        loss[part].backward(torch.linspace(0.5, 1.5, part.stop - part.start))
        grads.append(x.grad[part])
    for rank in range(WORLD):
        _, grad = rank_results[rank][(backend, name, True, "none", False)]
        torch.testing.assert_close(grad, grads[rank], rtol=1e-5, atol=1e-7)


def test_ddp_with_ddp_scale_matches_single_process_parameter_gradients(rank_results):
    expected = _ddp_gradients(slice(0, 3), scale=1.0)
    for rank in range(WORLD):
        torch.testing.assert_close(rank_results[rank]["ddp"], expected, rtol=1e-5, atol=1e-7)


def test_dist_sync_needs_a_process_group():
    logits, labels = torch.randn(2, 3, 4), torch.randint(0, 3, (2, 4))
    with pytest.raises(RuntimeError, match="dist_sync=True needs an initialised torch.distributed process group"):
        F.dice_loss(logits, labels, batch=True, dist_sync=True)
    criterion = lk.UnifiedFocalLoss(batch=True, dist_sync=True)  # building it needs no group yet
    with pytest.raises(RuntimeError, match="init_process_group"):
        criterion(logits, labels)
    with pytest.raises(ValueError, match="process_group is used only with dist_sync=True"):
        F.tversky_loss(logits, labels, process_group=object())
    with pytest.raises(TypeError, match="dist_sync must be a bool"):
        F.tversky_loss(logits, labels, dist_sync="yes")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_single_rank_group_equals_plain_call_in_every_dtype(single_rank_group, dtype):
    """A world of one: dist_sync must change nothing, for every dtype a backend serves."""
    logits, target, ignore_index = _inputs(False)
    logits = logits.to(dtype)
    for backend in lk.available_backends("cpu", dtype):
        for batch, reduction in ((True, "mean"), (True, "sum"), (False, "mean"), (True, "none")):
            runs = [
                _run(logits, target, ignore_index, backend, "unified", batch, reduction, dist_sync=sync)
                for sync in (False, True)
            ]
            (plain, plain_grad), (synced, synced_grad) = runs
            assert synced.dtype == plain.dtype and synced_grad.dtype == dtype
            torch.testing.assert_close(synced, plain, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(synced_grad, plain_grad, rtol=1e-2 if dtype != torch.float64 else 1e-9, atol=0)


def test_single_rank_group_fused_backends_refuse_double_backward(single_rank_group):
    """The synced path's backward is a fused gradient pass too: create_graph=True raises, as without sync."""
    logits, target, ignore_index = _inputs(False)
    for backend in _backends():
        x = logits.detach().clone().requires_grad_(True)
        options = dict(batch=True, ignore_index=ignore_index, backend=backend, dist_sync=True)
        loss = F.unified_focal_loss(x, target, **options)
        if backend == "reference":
            (grad,) = torch.autograd.grad(loss, x, create_graph=True)
            assert grad.requires_grad
            continue
        with pytest.raises(RuntimeError, match=f"double backward is not supported by backend '{backend}'"):
            torch.autograd.grad(loss, x, create_graph=True)


def test_single_rank_group_nonfinite_logit_gives_nan_loss(single_rank_group):
    """The non-finite logits policy holds on the synced path too (Triton applies it in its statistics pass)."""
    logits, target, ignore_index = _inputs(False)
    logits[1, 2, 0, 0, 0] = float("-inf")  # finite softmax: only the policy makes the loss NaN
    for backend in _backends():
        for name in ("unified", "dice"):
            for batch in (False, True):
                options = dict(batch=batch, ignore_index=ignore_index, backend=backend, dist_sync=True)
                assert LOSSES[name](logits, target, **options).isnan(), f"{backend} {name} batch={batch}"
                per_image = LOSSES[name](logits, target, reduction="none", **options)
                assert per_image[1].isnan() and per_image[[0, 2]].isfinite().all(), f"{backend} {name} {batch}"
