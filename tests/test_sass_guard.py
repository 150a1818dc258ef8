"""The static GPU guard (``bench/sass_guard.py``): the package's Triton kernels, compiled for sm_90
as the launchers specialise them, keep their recorded budgets, and the guard does catch spills,
scalar logit loads and budget overruns on real compiler output.

The compiling runs in a child process without ``TRITON_INTERPRET`` (this one interprets).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench import sass_guard

ROOT = Path(__file__).resolve().parent.parent
DATA = json.loads(sass_guard.BUDGET_FILE.read_text())


def _compiled_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def test_package_kernels_keep_their_recorded_budgets(tmp_path):
    out = tmp_path / "guard.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.sass_guard", "--json", str(out)],
        cwd=ROOT,
        env=_compiled_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {row["workload"] for row in rows} == set(DATA["workloads"])
    assert not result["unmatched"]
    for row in rows:
        assert row["sass_per_elem"] > 0 or row["loop"], row  # a loop-free kernel does some work per element
    # The region kernels read the logits: the guard must have found those loads (else the
    # vector-load rule would pass vacuously).
    assert all(row["logit_loads"] for row in rows if "_region_kernel" in row["launch"])


# One vectorised, one strided (scalar) and one register-starved kernel, compiled through the guard.
SYNTHETIC = textwrap.dedent(
    """
    import json, sys
    import torch
    import triton
    import triton.language as tl
    from bench import sass_guard

    @triton.jit
    def copy_contiguous(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)

    @triton.jit
    def copy_strided(x_ptr, y_ptr, n, stride, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs * stride, mask=offs < n) * 2, mask=offs < n)

    @triton.jit
    def scale_by_sum(x_ptr, y_ptr, BLOCK: tl.constexpr):
        # Every thread keeps BLOCK / 32 values alive across the reduction.
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs).to(tl.float32)
        x = tl.exp(x) * tl.log(x + 2.0)
        tl.store(y_ptr + offs, (x * tl.sum(x, 0)).to(tl.bfloat16))

    n = 1 << 16
    x = torch.randn(3 * n, dtype=torch.bfloat16)
    y = torch.empty(n, dtype=torch.bfloat16)
    with sass_guard.compiling(90) as compiler:
        compiler.logits_storage = sass_guard._storage(x)
        compiler.workload, compiler.phase = "synthetic", "fwd"
        copy_contiguous[(n // 1024,)](x, y, n, BLOCK=1024, num_warps=4)
        copy_strided[(n // 1024,)](x, y, n, 3, BLOCK=1024, num_warps=4)
        scale_by_sum[(1,)](x, y, BLOCK=4096, num_warps=1, maxnreg=32)
    launches = compiler.launches
    censuses = {launch.asm["cubin"]: sass_guard.sass_census(launch.asm["cubin"]) for launch in launches}
    rows = [sass_guard.analyse(launch, {"shape": [n]}, censuses) for launch in launches]
    json.dump(rows, sys.stdout)
    """
)


@pytest.fixture(scope="module")
def synthetic_rows(tmp_path_factory) -> dict[str, dict]:
    script = tmp_path_factory.mktemp("guard") / "synthetic.py"
    script.write_text(SYNTHETIC)
    done = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, env=_compiled_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return {row["launch"].split(":")[1].split("#")[0]: row for row in json.loads(done.stdout)}


def _failing(row: dict, budget: float, known: dict | None = None) -> tuple[list[str], list[str]]:
    entry = {"workload": row["workload"], "launch": row["launch"], "budget": budget, "known": known or {}}
    data = {**DATA, "launches": [entry]}
    (evaluated,) = sass_guard.evaluate([dict(row)], data)
    return evaluated["failing"], evaluated["stale"]


def test_guard_passes_a_vectorised_kernel_and_catches_a_strided_one(synthetic_rows):
    vector, strided = synthetic_rows["copy_contiguous"], synthetic_rows["copy_strided"]
    assert vector["narrowest_logit_load"] == 128 and vector["spill_instructions"] == 0
    assert _failing(vector, budget=vector["sass_per_elem"]) == ([], [])
    assert strided["narrowest_logit_load"] == 16
    assert _failing(strided, budget=strided["sass_per_elem"])[0] == ["scalar_logits"]
    # A rule recorded as known is not a failure; a known rule that holds again is reported stale.
    assert _failing(strided, strided["sass_per_elem"], {"scalar_logits": "why"}) == ([], [])
    assert _failing(vector, vector["sass_per_elem"], {"scalar_logits": "why"}) == ([], ["scalar_logits"])


def test_guard_catches_spills(synthetic_rows):
    starved = synthetic_rows["scale_by_sum"]
    assert starved["spill_instructions"] > 0 and starved["registers"] <= 32, starved
    assert "spills" in _failing(starved, budget=starved["sass_per_elem"])[0]


def test_guard_catches_a_budget_overrun_and_a_missing_budget(synthetic_rows):
    vector = synthetic_rows["copy_contiguous"]
    figure = vector["sass_per_elem"]
    slack = figure * DATA["tolerance"] + DATA["absolute_tolerance"]
    assert _failing(vector, budget=figure - 2 * slack - 1e-3 * figure)[0] == ["budget"]
    assert _failing(vector, budget=figure * 0.999)[0] == []  # inside the tolerance
    entries = {**DATA, "launches": []}
    (evaluated,) = sass_guard.evaluate([dict(vector)], entries)
    assert evaluated["failing"] == ["budget"], "a launch without a recorded budget must fail"


PTX = """
.visible .entry k(
	.param .u64 .ptr .global .align 1 k_param_0,
	.param .u64 .ptr .global .align 1 k_param_1,
	.param .u32 k_param_2
)
{
	.loc	1 10 0                          // a.py:10:0
	ld.param.b64 	%rd1, [k_param_0];
$L__tmp0:
	.loc	1 11 3
	ld.param.b64 	%rd2, [k_param_1];
	ld.param.b32 	%r1, [k_param_2];
	mul.wide.s32 	%rd3, %r1, 2;
	add.s64 	%rd4, %rd1, %rd3;
	.loc	1 12 3
	@%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd4 + 0 ];
	ld.global.b16 	%rs1, [ %rd4 + 16 ];
	add.s64 	%rd5, %rd2, %rd3;
	.loc	1 13 3
	st.global.v2.b32 	[ %rd5 + 0 ], { %r2, %r3 };
	ld.global.b32 	%r6, [ %rd5 + 0 ];
	cvt.u64.u32 	%rd6, %r6;
	add.s64 	%rd7, %rd2, %rd6;
	st.global.b8 	[ %rd7 + 0 ], %rs1;
	ret;
}
"""


def test_ptx_loads_and_stores_are_traced_to_their_pointer_parameter():
    accesses = sass_guard.global_accesses(PTX)
    assert dict(accesses[0]["load"]) == {128: 1, 16: 1}  # through a .loc and a label
    assert dict(accesses[1]["store"]) == {64: 1, 8: 1}
    assert dict(accesses[1]["load"]) == {32: 1}
    # A loaded value used as an index is data: the last store is not the first parameter's.
    assert not accesses[0]["store"]


def test_write_budgets_keeps_known_reasons_and_records_new_violations(tmp_path):
    rows = [
        {"workload": "w", "launch": "fwd:k#0", "spill_instructions": 2, "stack": 8, "narrowest_logit_load": 16,
         "sass_per_elem": 12.345},
        {"workload": "w", "launch": "bwd:k#0", "spill_instructions": 0, "stack": 0, "narrowest_logit_load": 128,
         "sass_per_elem": 3.0},
    ]  # fmt: skip
    data = {**DATA, "launches": [{"workload": "w", "launch": "fwd:k#0", "budget": 1.0, "known": {"spills": "why"}}]}
    path = tmp_path / "budget.json"
    sass_guard.write_budgets(rows, data, path)
    written = {e["launch"]: e for e in json.loads(path.read_text())["launches"]}
    assert written["fwd:k#0"]["budget"] == 12.35
    assert written["fwd:k#0"]["known"]["spills"] == "why" and "scalar_logits" in written["fwd:k#0"]["known"]
    assert written["bwd:k#0"] == {"workload": "w", "launch": "bwd:k#0", "budget": 3.0}
    assert sass_guard.unmatched(rows[1:], {"launches": list(written.values())}, {"w"}) == ["w fwd:k#0"]
