"""Benchmark suite of lmfloss-kernels: speed, peak memory and bandwidth of every provider.

Providers: ``eager`` (the reference through the public API), ``compile`` (``torch.compile`` of
the reference family function), ``monai`` (MONAI's closest loss, with a note saying how it
differs) and every fused backend that is built for the device (``triton``, ``cuda``, ``cpu``).
``python -m bench`` is the command-line runner (:mod:`bench.runner`); ``pytest bench/`` runs
the pytest-benchmark versions of the same cases (:mod:`bench.test_bench_losses`).
"""
