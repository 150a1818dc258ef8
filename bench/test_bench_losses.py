"""pytest-benchmark versions of the runner's cases: ``pytest bench/ --benchmark-group-by=group``.

Every workload x provider x mode at one size (a 32^3 volume or 64k rows on the CPU, 128^3 or
1M rows on a GPU). The default ``pytest`` run collects only ``tests/``; these run on request and
are compared with pytest-benchmark's own tooling (``--benchmark-autosave``,
``--benchmark-compare``). A provider that is not built for this device is skipped; the
command-line runner (``python -m bench``) adds memory, bandwidth and the size sweeps.
"""

import pytest
import torch

from bench import runner
from bench.workloads import WORKLOADS, logits_shape, make_inputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = ("bf16", "fp32") if DEVICE.type == "cuda" else ("fp32",)


def _size(dense: bool) -> int:
    if DEVICE.type == "cuda":
        return 128 if dense else 1 << 20
    return 32 if dense else 1 << 16


def _synchronize():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", runner.MODES)
@pytest.mark.parametrize("provider", runner.PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss", sorted(WORKLOADS))
def test_loss(benchmark, loss, dtype, provider, mode):
    workload = WORKLOADS[loss]
    target = workload.target_kinds[0]
    case = runner.Case(loss, _size(workload.dense), 4, dtype, target, (mode,))
    shape = logits_shape(workload, case.size, case.classes)
    inputs = [make_inputs(workload, shape, runner.DTYPES[dtype], target, DEVICE)]
    settings = runner.Settings(device=DEVICE, providers=(provider,))
    fn = runner.provider_fn(provider, workload, case, inputs, settings)
    if fn is None or isinstance(fn, str):
        pytest.skip(fn or f"{provider} does not apply to {loss}")
    run, setup = runner.mode_runner(mode, fn, inputs)

    def call():
        run(0)
        _synchronize()

    def prepare():
        setup(0)
        _synchronize()

    benchmark.group = f"{loss} {'x'.join(map(str, shape))} {dtype} {mode}"
    path = settings.paths.get((case, provider), runner.PATHS.get(provider, "fused"))
    benchmark.extra_info.update(
        provider=provider, path=path, device=str(DEVICE), monai_note=settings.notes.get(loss, "")
    )
    benchmark.pedantic(
        call,
        setup=prepare if setup is not None else None,
        rounds=10,
        warmup_rounds=2 if provider == "compile" else 1,
    )
