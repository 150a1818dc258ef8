"""Timing, peak memory and copy bandwidth, on CUDA devices and on the CPU.

Time
    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every repetition, gradients
    reset outside the timed region) when Triton is importable, else CUDA events around each
    call after a cache-flushing write. CPU: wall clock (``time.perf_counter``) around each call;
    CPU kernels are synchronous, so the clock brackets the whole computation. Inputs are
    rotated over several copies when one copy would stay in the last-level cache. Both report
    the median and the 20% / 80% quantiles over the repetitions, after a warm-up that also
    absorbs ``torch.compile``'s compilation.

Peak extra memory
    CUDA: ``torch.cuda.max_memory_allocated()`` during one call minus the memory allocated
    before it (the caching allocator's exact view of live tensors). CPU: the process's peak
    resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) during one call minus
    the resident set before it. For that call only, glibc is told to serve blocks above 64 KiB
    with ``mmap`` and to give them back on free, and the call runs in a fresh thread (a glibc
    arena without free blocks to recycle), so a tensor counts while it lives and not after.
    Limits of the CPU method: it needs Linux and glibc; it counts pages that were touched (an
    allocated but never written buffer costs nothing), so it measures memory actually used, not
    requested; allocations under 64 KiB come from memory already resident and are not counted;
    the thread's stack and OpenMP workers' arenas add noise of a few hundred KiB. A peak below
    64 KiB (:func:`memory_floor_bytes`) is therefore below the method's resolution, not zero.

Copy bandwidth
    ``dst.copy_(src)`` of a tensor much larger than the caches; bytes = read + write.
"""

from __future__ import annotations

import ctypes
import statistics
import threading
import time
from collections.abc import Callable

import torch

QUANTILES = (0.5, 0.2, 0.8)
# Inputs smaller than this get several rotating copies on the CPU, so that successive calls do
# not find the previous call's data in the cache (larger than the last-level cache of common
# server CPUs).
CPU_CACHE_BYTES = 64 << 20


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    cuts = statistics.quantiles(samples, n=10, method="inclusive")  # deciles: 20% = cuts[1], 80% = cuts[7]
    return statistics.median(samples), cuts[1], cuts[7]


def rotation_count(device: torch.device, input_bytes: int, max_copies: int = 8) -> int:
    """How many input copies the CPU timer should rotate through (1 on CUDA: do_bench flushes L2)."""
    if device.type != "cpu" or input_bytes >= CPU_CACHE_BYTES:
        return 1
    return max(1, min(max_copies, -(-2 * CPU_CACHE_BYTES // max(input_bytes, 1))))


def time_cpu(
    fn: Callable[[int], object],
    copies: int,
    *,
    warmup: int,
    min_reps: int,
    max_reps: int,
    budget_s: float,
    setup: Callable[[int], object] | None = None,
) -> tuple[float, float, float, int]:
    """(median, p20, p80) seconds and the repetition count; ``fn(i)`` runs on input copy ``i``.

    ``setup(i)``, when given, runs before every call of ``fn(i)`` outside the timed region.
    """
    for i in range(warmup):
        if setup is not None:
            setup(i % copies)
        fn(i % copies)
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() - start < budget_s):
        i = len(samples) % copies
        if setup is not None:
            setup(i)
        t0 = time.perf_counter()
        fn(i)
        samples.append(time.perf_counter() - t0)
    return (*_quantiles(samples), len(samples))


def time_cuda(
    fn: Callable[[], object],
    grad_to_none: list[torch.Tensor],
    *,
    warmup: int,
    min_reps: int,
    budget_s: float,
    setup: Callable[[], object] | None = None,
) -> tuple[float, float, float, int]:
    """(median, p20, p80) seconds and the repetition count of ``fn`` on the current CUDA device.

    ``setup``, when given, runs before every call outside the timed region (CUDA events then
    replace do_bench, which has no such hook).
    """
    for _ in range(warmup):  # compilation and autotuning happen here, outside the measurement
        if setup is not None:
            setup()
        fn()
    torch.cuda.synchronize()
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None and setup is None:
        ms = do_bench(fn, warmup=25, rep=max(1, int(budget_s * 1000)), grad_to_none=grad_to_none, quantiles=QUANTILES)
        return ms[0] / 1e3, ms[1] / 1e3, ms[2] / 1e3, -1
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    samples: list[float] = []
    spent = 0.0
    while len(samples) < min_reps or spent < budget_s:
        for t in grad_to_none:
            t.grad = None
        if setup is not None:
            setup()
        flush.zero_()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(begin.elapsed_time(end) / 1e3)
        spent += samples[-1]
    return (*_quantiles(samples), len(samples))


# --------------------------------------------------------------------------------------------
# Memory

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# While measuring, blocks from this size up are mmapped (and counted); smaller ones are served
# from memory already resident and do not show, so this is also the CPU method's resolution.
CPU_MEMORY_FLOOR_BYTES = 1 << 16
_libc = None
_rss_ready: bool | None = None


def _malloc_for_measuring(measuring: bool) -> None:
    """Switch glibc between exact accounting and the steady state of a long-running process.

    Measuring: blocks above 64 KiB are mmapped and unmapped on free, so a freed tensor leaves
    the resident set and a new one cannot hide in memory freed earlier. Timing: the thresholds
    glibc's own dynamic adjustment reaches in a training loop (32 MiB mmap, 64 MiB trim), so
    timings do not pay a page fault for every temporary.
    """
    if measuring:
        _libc.mallopt(_M_MMAP_THRESHOLD, CPU_MEMORY_FLOOR_BYTES)
        _libc.mallopt(_M_TRIM_THRESHOLD, CPU_MEMORY_FLOOR_BYTES)
        _libc.malloc_trim(0)
    else:
        _libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        _libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)


def prepare_rss() -> bool:
    """True if the CPU peak-memory method works here (Linux, glibc, /proc/self/clear_refs)."""
    global _libc, _rss_ready
    if _rss_ready is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _malloc_for_measuring(False)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            _status_bytes("VmHWM")
            _rss_ready = True
        except (OSError, AttributeError, ValueError):
            _rss_ready = False
    return _rss_ready


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"{key} not in /proc/self/status")


def memory_floor_bytes(device: torch.device) -> int:
    """Smallest peak that :func:`peak_extra_bytes` resolves on ``device``; below it, it reads ~0.

    CUDA: 0 (the caching allocator counts every live block exactly). CPU: 64 KiB, the size below
    which glibc serves allocations from memory already resident while measuring.
    """
    return 0 if device.type == "cuda" else CPU_MEMORY_FLOOR_BYTES


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory above the starting level during one call of ``fn`` (NaN if not measurable)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    if not prepare_rss():
        return float("nan")
    _malloc_for_measuring(True)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_bytes("VmRSS")
        _run_in_fresh_thread(fn)
        return float(max(0, _status_bytes("VmHWM") - base))
    finally:
        _malloc_for_measuring(False)


def _run_in_fresh_thread(fn: Callable[[], object]) -> None:
    # glibc serves a request from free blocks of the caller's arena before it considers mmap, so
    # in the main thread, whose arena the timed repetitions filled, a freed temporary stays
    # resident and is counted again next to the next one. A new thread gets an arena with no
    # large free blocks, where every block above the threshold is a fresh mmap.
    errors: list[BaseException] = []

    def target():
        try:
            fn()
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(error)

    thread = threading.Thread(target=target, name="bench-memory")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


# --------------------------------------------------------------------------------------------
# Copy bandwidth


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Bytes per second of ``dst.copy_(src)`` on ``device`` (read + write counted)."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        median, _, _, _ = time_cuda(lambda: dst.copy_(src), [], warmup=3, min_reps=10, budget_s=0.2)
    else:
        median, _, _, _ = time_cpu(lambda i: dst.copy_(src), 1, warmup=2, min_reps=5, max_reps=20, budget_s=1.0)
    return 2 * nbytes / median
