"""Static guard of the Triton kernels: what they compile to for sm_90, checked without a GPU.

The public API is called at headline shapes on CPU tensors, with the Triton backends' availability
checks answered as for a CUDA device and torch.cuda's device queries (capability, properties) as
for an sm_90 GPU of 132 SMs (a launcher that asks Triton's driver itself is not covered). No
kernel runs: each launch (``JITFunction.run``) is compiled with ``triton.compile`` for
``GPUTarget("cuda", 90, 32)`` exactly as the launcher specialised it (its constexprs, divisibility
attributes, ``num_warps``), and the ``cuobjdump`` Triton bundles (``triton/backends/nvidia/bin``)
reads the result. Per launch:

* **spills**: local-memory stores / loads (``STL`` / ``LDL``) in the SASS and the stack frame
  (``cuobjdump -res-usage``); a Triton kernel has no local arrays, so these are spills;
* **logit load widths**: the ``ld.global`` instructions of the PTX whose address derives from the
  logits pointer parameter (a data-flow pass from ``ld.param``), in bits per thread: on a
  contiguous layout a vectorised kernel loads 128 bits, a scalar one the element's 16 or 32;
* **SASS/el** = static SASS instructions per thread x threads launched / logit elements. For a
  kernel with a loop (a backward branch in its SASS) the loop body counts once: the figure is then
  a lower bound that falls as a program loops over more tiles, flagged ``loop`` in the table.

The expectations are data, ``tests/sass_budget.json``: the workloads (public call, shape, dtypes;
``"mask"`` targets are uint8 0/1 maps of the logits' shape, the dense uint8 path of the region
kernels; the sigmoid mode is reached through ``functional._region_family(..., sigmoid=True)``),
a tolerance, and per launch (``workload``, ``pass:kernel#n``) its budget of SASS/el and the rules it
is known to break today (``known``: ``spills`` / ``scalar_logits`` with the reason), which the lead
removes once a kernel is rewritten. A launch fails the guard when it spills, loads logits narrower
than ``min_logit_load_bits`` (contiguous inputs) or exceeds its budget by more than the tolerance,
unless the rule is listed as known for it; a launch without a budget fails too (regenerate).

    python -m bench.sass_guard                         # the table; exit 1 on a violation
    python -m bench.sass_guard --workloads lmf_rows_bf16 --json /tmp/guard.json
    python -m bench.sass_guard --write-budgets         # record today's SASS/el as the budgets,
                                                       # keeping the known violations and notes

It must run in its own process with ``TRITON_INTERPRET`` unset (the kernels are compiled, not
interpreted); ``tests/test_sass_guard.py`` starts it so.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import functools
import importlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BUDGET_FILE = Path(__file__).resolve().parent.parent / "tests" / "sass_budget.json"
RULES = ("spills", "scalar_logits", "budget")


# ------------------------------------------------------------------------------------------- PTX


def _ptx_statements(ptx: str) -> list[tuple[str, list[str]]]:
    """``(opcode, operands)`` of every PTX instruction, predicates and labels stripped."""
    # Directives (.loc, .file, .reg, ...) end without ";" or stand alone: dropped line by line, so
    # that none swallows the instruction after it.
    lines = (line.split("//", 1)[0].strip() for line in ptx.splitlines())
    body = " ".join(line for line in lines if not line.startswith("."))
    statements = []
    for chunk in body.split(";"):
        chunk = re.sub(r"^[\s{}()]*", "", chunk)
        chunk = re.sub(r"^\$?[\w.$]+:\s*", "", chunk)  # a label
        chunk = re.sub(r"^@!?%\w+\s+", "", chunk).strip()  # a guard predicate
        if not chunk or chunk.startswith("."):
            continue
        opcode, _, rest = chunk.partition(" ")
        operands, depth, current = [], 0, ""
        for ch in rest:
            depth += ch in "[{"
            depth -= ch in "]}"
            if ch == "," and depth == 0:
                operands.append(current.strip())
                current = ""
            else:
                current += ch
        operands.append(current.strip())
        statements.append((opcode, [o for o in operands if o]))
    return statements


_REG = re.compile(r"%[a-z]+\d+")


def _bits(opcode: str) -> int:
    vector = re.search(r"\.v(\d)\b", opcode)
    width = re.search(r"\.[bsuf](\d+)\b", opcode)
    return (int(vector.group(1)) if vector else 1) * (int(width.group(1)) if width else 0)


def global_accesses(ptx: str) -> dict[int, dict[str, collections.Counter]]:
    """Per kernel parameter index: ``{"load": Counter(bits), "store": Counter(bits)}`` of the global
    loads and stores whose address derives from that parameter.

    A register loaded from ``<kernel>_param_<i>`` carries parameter ``i``; every other instruction
    passes the parameters of its sources to its destinations, except global loads (a loaded value
    is data, not an address) and comparisons; iterated to a fixed point (loops carry registers
    around). An address that derives from several parameters counts for each.
    """
    statements = _ptx_statements(ptx)
    carried: dict[str, set[int]] = collections.defaultdict(set)
    flows = []
    accesses = []
    for opcode, ops in statements:
        if opcode.startswith("ld.param"):
            param = re.search(r"_param_(\d+)", " ".join(ops[1:]))
            if param and ops:
                carried[ops[0]].add(int(param.group(1)))
        elif opcode.startswith("ld.global") and len(ops) > 1:
            accesses.append(("load", _bits(opcode), _REG.findall(ops[1])))
        elif opcode.startswith("st.global") and ops:
            accesses.append(("store", _bits(opcode), _REG.findall(ops[0])))
        elif not opcode.startswith(("setp", "st.", "ld.", "bra", "atom", "red", "bar", "ret")) and len(ops) > 1:
            flows.append((_REG.findall(ops[0]), [r for o in ops[1:] for r in _REG.findall(o)]))
    changed = True
    while changed:
        changed = False
        for dests, sources in flows:
            incoming = set().union(*(carried.get(s, set()) for s in sources))
            for dest in dests:
                if not incoming <= carried[dest]:
                    carried[dest] |= incoming
                    changed = True
    result: dict[int, dict[str, collections.Counter]] = {}
    for kind, bits, registers in accesses:
        for param in set().union(*(carried.get(r, set()) for r in registers)) if registers else ():
            result.setdefault(param, {"load": collections.Counter(), "store": collections.Counter()})[kind][bits] += 1
    return result


# ------------------------------------------------------------------------------------------ SASS

_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: Triton's bundled {name} is missing (install torch's Triton)")
    return str(path)


def sass_census(cubin: bytes) -> dict:
    """Instruction census of a cubin: SASS instructions (NOPs excluded), local-memory stores and
    loads, backward branches (loops), and the stack frame and registers per thread."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        done = subprocess.run([_tool("cuobjdump"), "-sass", "-res-usage", f.name], capture_output=True, text=True)
    sass = usage = done.stdout
    ops = collections.Counter()
    loops = 0
    for line in sass.splitlines():
        m = _SASS_LINE.match(line)
        if not m:
            continue
        opcode = m.group(2)
        ops[opcode.split(".")[0]] += 1
        target = re.search(r"0x([0-9a-f]+)", m.group(3))
        if opcode.startswith("BRA") and target and int(target.group(1), 16) < int(m.group(1), 16):
            loops += 1
    if not ops:
        raise RuntimeError("cuobjdump -sass printed no instruction")
    resources = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return {
        "instructions": sum(n for op, n in ops.items() if op != "NOP"),
        "local_stores": ops["STL"],
        "local_loads": ops["LDL"],
        "loops": loops,
        "registers": int(resources.group(1)) if resources else None,
        "stack": int(resources.group(2)) if resources else None,
    }


# --------------------------------------------------------------------------------------- capture


@dataclass
class Launch:
    workload: str
    phase: str  # "fwd" or "bwd"
    kernel: str
    key: str = ""  # "phase:kernel#n", unique within the workload
    programs: int = 0
    num_warps: int = 0
    constexprs: dict = field(default_factory=dict)
    logits_param: int | None = None  # PTX parameter index of the logits pointer, None if not passed
    asm: dict = field(default_factory=dict)


def _storage(value) -> int | None:
    with contextlib.suppress(Exception):
        return value.untyped_storage().data_ptr()
    return None


class Compiler:
    """Stands in for ``JITFunction.run`` while installed: compiles each launch for the target and
    records it, launching nothing."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self.binders: dict[int, object] = {}
        self.compiled: dict[tuple, object] = {}
        self.launches: list[Launch] = []
        self.workload = ""
        self.phase = ""
        self.logits_storage: int | None = None

    def run(self, fn, *args, grid, warmup, **kwargs):
        import triton
        from triton import knobs
        from triton.compiler import ASTSource
        from triton.runtime.jit import create_function_from_signature

        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        if id(fn) not in self.binders:
            self.binders[id(fn)] = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound, specialization, options = self.binders[id(fn)](*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound, specialization, options)
        key = (id(fn), repr(signature), repr(constexprs), repr(attrs), repr(sorted(options.__dict__.items())))
        if key not in self.compiled:
            source = ASTSource(fn, signature, constexprs, attrs)
            self.compiled[key] = triton.compile(source, target=self.target, options=options.__dict__)
        compiled = self.compiled[key]
        if warmup:
            return None
        grid = grid(bound) if callable(grid) else grid
        names = list(bound)
        runtime = [name for name in names if signature.get(name) != "constexpr"]
        logits = [i for i, name in enumerate(runtime) if _storage(bound[name]) == self.logits_storage]
        self.launches.append(
            Launch(
                workload=self.workload,
                phase=self.phase,
                kernel=fn.__name__,
                programs=math.prod(int(g) for g in grid),
                num_warps=int(compiled.metadata.num_warps),
                constexprs={names[k[0]]: str(v) for k, v in constexprs.items()},
                logits_param=logits[0] if logits else None,
                asm={"ptx": compiled.asm["ptx"], "cubin": compiled.asm["cubin"]},
            )
        )
        return None


@contextlib.contextmanager
def _cuda_answers(arch: int, available: bool):
    """torch.cuda as a launcher on an sm_``arch`` H100-like GPU sees it (capability, properties, the
    current device; ``is_available()`` too when ``available``). The guard's whole capture answers
    the device queries (a launcher sizing a persistent grid asks for the SM count); only the
    availability checks are told that CUDA is available."""
    import torch

    class Properties:
        name = f"static sm_{arch}"
        major, minor = divmod(arch, 10)
        multi_processor_count = 132
        total_memory = 80 << 30
        warp_size = 32

    answers = {
        "get_device_capability": lambda device=None: divmod(arch, 10),
        "get_device_properties": lambda device=None: Properties(),
        "current_device": lambda: 0,
    }
    if available:
        answers["is_available"] = lambda: True
    saved = {name: getattr(torch.cuda, name) for name in answers}
    for name, answer in answers.items():
        setattr(torch.cuda, name, answer)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(torch.cuda, name, value)


def _open_gates(gates: list[str], arch: int) -> list[str]:
    """Answer each Triton availability check ``module:attribute`` (a function, or ``Class.method``)
    as for a CUDA device: CPU devices are passed on as ``cuda``, torch.cuda as on a GPU. Dicts and
    tuples of the module that hold the function get the wrapper too."""
    import torch

    cuda = torch.device("cuda")

    def wrap(original):
        def as_cuda(value):
            return cuda if isinstance(value, torch.device) and value.type == "cpu" else value

        def gate(*args, **kwargs):
            args = [as_cuda(a) for a in args]
            kwargs = {k: as_cuda(v) for k, v in kwargs.items()}
            with _cuda_answers(arch, available=True):
                return original(*args, **kwargs)

        return gate

    opened = []
    for gate in gates:
        module_name, _, path = gate.partition(":")
        owner_name, _, attribute = path.rpartition(".")
        try:
            module = importlib.import_module(module_name)
            owner = getattr(module, owner_name) if owner_name else module
            original = getattr(owner, attribute)
        except (ImportError, AttributeError) as error:
            raise RuntimeError(
                f"Triton availability check {gate!r} not found ({error}): update 'gates' in {BUDGET_FILE.name}"
            ) from error
        wrapped = wrap(original)
        setattr(owner, attribute, wrapped)
        for value in list(vars(module).values()):
            if isinstance(value, dict):
                for k, v in list(value.items()):
                    if v is original:
                        value[k] = wrapped
                    elif isinstance(v, tuple) and original in v:
                        value[k] = tuple(wrapped if e is original else e for e in v)
        opened.append(gate)
    return opened


def _inputs(spec: dict):
    import torch

    generator = torch.Generator().manual_seed(0)
    shape = tuple(spec["shape"])
    dtype = getattr(torch, spec["dtype"])
    logits = torch.empty(shape, dtype=dtype).normal_(generator=generator).requires_grad_(True)
    classes = shape[1]
    label_shape = shape[:1] + shape[2:]
    labels = torch.randint(0, classes, label_shape, generator=generator).to(getattr(torch, spec["label_dtype"]))
    if spec["target"] == "labels":
        return logits, labels
    if spec["target"] == "mask":
        return logits, torch.randint(0, 2, shape, generator=generator).to(getattr(torch, spec["label_dtype"]))
    onehot = torch.zeros(shape, dtype=getattr(torch, spec["onehot_dtype"]))
    return logits, onehot.scatter_(1, labels.long().unsqueeze(1), 1)


@contextlib.contextmanager
def compiling(arch: int):
    """A :class:`Compiler` that stands in for every ``JITFunction.run`` (kernel launch) inside."""
    if os.environ.pop("TRITON_INTERPRET", None) and "triton" in sys.modules:
        raise RuntimeError("triton was imported with TRITON_INTERPRET set: run the guard in a process without it")
    from triton.runtime import jit

    compiler = Compiler(arch)
    original_run = jit.JITFunction.run
    jit.JITFunction.run = lambda fn, *a, grid, warmup, **kw: compiler.run(fn, *a, grid=grid, warmup=warmup, **kw)
    try:
        yield compiler
    finally:
        jit.JITFunction.run = original_run
        seen: collections.Counter = collections.Counter()
        for launch in compiler.launches:
            base = f"{launch.phase}:{launch.kernel}"
            launch.key = f"{base}#{seen[(launch.workload, base)]}"
            seen[(launch.workload, base)] += 1


def capture(workloads: dict[str, dict], gates: list[str], arch: int) -> list[Launch]:
    """Compile every Triton launch of each workload's forward and backward."""
    with compiling(arch) as compiler, _cuda_answers(arch, available=False):
        _open_gates(gates, arch)
        for name, spec in workloads.items():
            module_name, _, function = spec["call"].rpartition(".")
            call = getattr(importlib.import_module(f"lmfloss_kernels.{module_name}"), function)
            begin = time.time()
            logits, target = _inputs(spec)
            compiler.workload, compiler.logits_storage = name, _storage(logits)
            compiler.phase = "fwd"
            before = len(compiler.launches)
            loss = call(logits, target, *spec.get("args", []), backend="triton", **spec.get("kwargs", {}))
            compiler.phase = "bwd"
            loss.backward()
            if len(compiler.launches) == before:
                raise RuntimeError(f"{name}: {spec['call']} launched no Triton kernel")
            print(f"[guard] {name}: {len(compiler.launches) - before} launches, {time.time() - begin:.1f} s",
                  file=sys.stderr)  # fmt: skip
    return compiler.launches


# ------------------------------------------------------------------------------------ evaluation


@functools.cache
def _accesses(ptx: str) -> dict:
    return global_accesses(ptx)


def analyse(launch: Launch, spec: dict, censuses: dict[bytes, dict]) -> dict:
    census = censuses[launch.asm["cubin"]]
    accesses = _accesses(launch.asm["ptx"])
    logits = accesses.get(launch.logits_param, {}) if launch.logits_param is not None else {}
    loads = logits.get("load", collections.Counter())
    elements = math.prod(spec["shape"])
    threads = launch.programs * launch.num_warps * 32
    return {
        "workload": launch.workload,
        "launch": launch.key,
        "programs": launch.programs,
        "num_warps": launch.num_warps,
        "registers": census["registers"],
        "stack": census["stack"],
        "spill_instructions": census["local_stores"] + census["local_loads"],
        "logit_loads": {str(bits): n for bits, n in sorted(loads.items(), reverse=True)},
        "narrowest_logit_load": min(loads) if loads else None,
        "sass_per_thread": census["instructions"],
        "loop": census["loops"] > 0,
        "sass_per_elem": census["instructions"] * threads / elements,
    }


def violations(row: dict, expected: dict | None, data: dict) -> tuple[list[str], list[str]]:
    """(broken rules, known rules no longer broken) of one analysed launch against its entry."""
    known = (expected or {}).get("known", {})
    broken = []
    if row["spill_instructions"] or row["stack"]:
        broken.append("spills")
    narrowest = row["narrowest_logit_load"]
    if narrowest is not None and narrowest < data["min_logit_load_bits"]:
        broken.append("scalar_logits")
    if expected is None or expected.get("budget") is None:
        broken.append("budget")
    elif row["sass_per_elem"] > expected["budget"] * (1 + data["tolerance"]) + data["absolute_tolerance"]:
        broken.append("budget")
    failing = [rule for rule in broken if rule not in known]
    stale = [rule for rule in known if rule not in broken]
    return failing, stale


def unmatched(rows: list[dict], data: dict, workloads) -> list[str]:
    """Entries of the data for launches of these workloads that no longer happen (regenerate)."""
    launched = {(row["workload"], row["launch"]) for row in rows}
    return [f"{e['workload']} {e['launch']}" for e in data["launches"]
            if e["workload"] in workloads and (e["workload"], e["launch"]) not in launched]  # fmt: skip


def evaluate(rows: list[dict], data: dict) -> list[dict]:
    entries = {(e["workload"], e["launch"]): e for e in data["launches"]}
    for row in rows:
        entry = entries.get((row["workload"], row["launch"]))
        row["budget"] = entry.get("budget") if entry else None
        row["known"] = sorted((entry or {}).get("known", {}))
        row["failing"], row["stale"] = violations(row, entry, data)
    return rows


def format_table(rows: list[dict]) -> str:
    header = ("workload", "launch", "grid", "warps", "regs", "spill", "logit loads (bits x n)", "SASS/thr",
              "SASS/el", "budget", "known", "FAILS")  # fmt: skip
    lines = []
    for row in rows:
        loads = "+".join(f"{bits}x{n}" for bits, n in row["logit_loads"].items()) or "-"
        lines.append((row["workload"], row["launch"], str(row["programs"]), str(row["num_warps"]),
                      str(row["registers"]), f"{row['spill_instructions']}/{row['stack']}", loads,
                      f"{row['sass_per_thread']}{' loop' if row['loop'] else ''}", f"{row['sass_per_elem']:.1f}",
                      "-" if row.get("budget") is None else f"{row['budget']:.1f}", ",".join(row.get("known", [])),
                      ",".join(row.get("failing", [])) + (f" (stale known: {','.join(row['stale'])})"
                                                          if row.get("stale") else "")))  # fmt: skip
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    return "\n".join(out)


def write_budgets(rows: list[dict], data: dict, path: Path) -> None:
    """Today's SASS/el as every launch's budget; known violations and notes of kept launches stay,
    and a launch that breaks a rule today gets it listed as known (to be removed by its rewrite)."""
    old = {(e["workload"], e["launch"]): e for e in data["launches"]}
    launches = []
    for row in rows:
        entry = dict(old.get((row["workload"], row["launch"]), {}))
        failing, _ = violations(row, {"budget": row["sass_per_elem"], "known": {}}, data)
        known = {rule: entry.get("known", {}).get(rule, "recorded by --write-budgets: broken today")
                 for rule in failing}  # fmt: skip
        entry.update(workload=row["workload"], launch=row["launch"], budget=round(row["sass_per_elem"], 2))
        if known:
            entry["known"] = known
        else:
            entry.pop("known", None)
        launches.append(entry)
    path.write_text(json.dumps({**data, "launches": launches}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sass_guard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=Path, default=BUDGET_FILE, help="the expectations (default %(default)s)")
    parser.add_argument("--workloads", help="comma-separated subset of the file's workloads")
    parser.add_argument("--json", type=Path, help="write the analysed launches here")
    parser.add_argument("--write-budgets", action="store_true", help="record today's figures in --budgets")
    args = parser.parse_args(argv)
    data = json.loads(args.budgets.read_text())
    workloads = data["workloads"]
    if args.workloads:
        workloads = {name: workloads[name] for name in args.workloads.split(",")}
    started = time.time()
    launches = capture(workloads, data["gates"], data["arch"])
    # Identical kernels (workloads that differ only in runtime arguments) are disassembled once;
    # cuobjdump runs in parallel.
    binaries = {launch.asm["cubin"] for launch in launches}
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        censuses = dict(zip(binaries, pool.map(sass_census, binaries), strict=True))
    rows = evaluate([analyse(launch, workloads[launch.workload], censuses) for launch in launches], data)
    print(format_table(rows))
    failing = [row for row in rows if row["failing"]]
    missing = unmatched(rows, data, workloads)
    for entry in missing:
        print(f"no such launch any more: {entry} (regenerate the budgets)")
    print(f"{len(rows)} launches of {len(workloads)} workloads in {time.time() - started:.1f} s; "
          f"{len(failing)} failing")  # fmt: skip
    if args.json:
        result = {"seconds": time.time() - started, "rows": rows, "unmatched": missing}
        args.json.write_text(json.dumps(result, indent=1))
    if args.write_budgets:
        if args.workloads:
            parser.error("--write-budgets records every workload: leave --workloads out")
        write_budgets(rows, data, args.budgets)
        print(f"wrote {args.budgets}")
        return 0
    return 1 if failing or missing else 0


if __name__ == "__main__":
    sys.exit(main())
