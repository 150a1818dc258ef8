"""Benchmark suite of lmfloss-kernels: speed, peak memory and bandwidth of every provider.

Providers: ``eager`` (the reference through the public API), ``compile`` (``torch.compile`` of
the reference family function), ``monai`` (MONAI's closest loss, with a note saying how it
differs) and every fused backend that is built for the device (``triton``, ``cuda``, ``cpu``);
for the MONAI / nnU-Net drop-in classes, the library's own class (``monai``, ``nnunet``) and its
``torch.compile`` against ours (:mod:`bench.dropin`).
``python -m bench`` is the command-line runner (:mod:`bench.runner`), which ends with the
per-call overhead table (:mod:`bench.overhead_stage`); ``pytest bench/`` runs
the pytest-benchmark versions of the same cases (:mod:`bench.test_bench_losses`).
"""
