"""Static GPU checks that need no GPU: registers, spills and tensor-core instructions of every kernel the
dispatcher can launch, for sm_90a (H100/H200) and sm_80 (A100).

* Triton: the fused linear_dot kernel at every config of the one table the launcher takes its configs from
  (``_common.LINEAR_CONFIGS``), in each dot mode the config serves, both operand layouts and every load path of
  the arch — TMA descriptors (sm_90a), pointer loads with R a multiple of BLOCK_K, and pointer loads with the
  partial last step peeled ("ragged-r") — and the row kernels at the configs ``rows_config`` gives at LLM
  widths. Each is compiled with Triton's ahead-of-time compiler (``triton.compile`` of an ``ASTSource`` for a
  ``GPUTarget``), with the argument specialisations the runtime would make (unit strides as constants,
  16-divisible sizes, strides and pointers; descriptors typed by their block shape), then assembled by
  ``ptxas -v`` — the ptxas Triton itself uses for that architecture. Tensor-core instructions are counted in
  the PTX (``wgmma.mma_async`` on sm_90a, ``mma.sync`` on sm_80). Each row says whether it is ``launched``:
  whether ``_common.linear_configs`` gives that config for that arch and load path (a 128×256 tile with pointer
  loads, or on sm_80, is compiled and reported but never launched).
* CUDA: the built ``geffect_fast._C_cuda`` module's kernels, read with ``cuobjdump -res-usage`` (registers,
  stack/local bytes per kernel and architecture) and ``cuobjdump -sass`` (HMMA/HGMMA counts).

Writes a JSON list of {kernel, config, arch, launched, registers, spill_bytes, tensor_core_ops, shared_bytes} and a
Markdown table, and exits non-zero when a launched kernel spills or a launched bf16/fp16 ``linear_dot`` config
has no tensor-core instruction.

    python -m benchmarks.gpu_static --json benchmarks/results/gpu_static.json --md benchmarks/results/gpu_static.md
    bash benchmarks/gpu_static_triton36.sh   # the same under the GPU image's Triton 3.6 (a throwaway venv)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__":  # before any kernel module is imported; never when a test imports this module
    os.environ["TRITON_INTERPRET"] = "0"  # compile for real: the interpreter has no PTX
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

ARCHS = {"sm_90a": 90, "sm_80": 80}
#: a representative LLM width for the row kernels' configs (rows_config depends on it)
WIDTH = 4096


@dataclass
class Variant:
    """One compile: a kernel at one config, its argument types and specialisations."""

    kernel: str  #: "<module>.<jit function>" under geffect_fast.ops.triton
    config: str  #: a readable label of the config and dtypes
    types: dict[str, str]  #: argument -> Triton type ("*bf16", "i32"); absent arguments are i32
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int = 1
    ones: tuple[str, ...] = ()  #: integer arguments specialised as the constant 1 (unit strides)
    divisible: tuple[str, ...] = ()  #: arguments with a 16-divisibility hint
    expect_tensor_cores: bool = False
    arch: str = ""
    launched: bool = True  #: whether the dispatcher can launch it on ``arch``
    result: dict = field(default_factory=dict)


#: per dot mode (``_common.half_split_mode``): (label, activations' type, direction's type, operand layouts); the
#: layouts: "vT" (M = Vᵀ, unit stride over r: i ≥ o, q/k/v/o and down projections) and "v" (unit stride over c)
LINEAR_MODES = {
    0: [("bf16", "bf16", "bf16", ("vT", "v")), ("fp16", "fp16", "fp16", ("vT",))],
    1: [("split-bf16", "bf16", "fp32", ("vT", "v"))],
    2: [("split-fp16", "fp16", "fp32", ("v",))],
    3: [("fp32", "fp32", "fp32", ("v",))],
}
#: load paths per arch: TMA descriptors (sm_90 only), pointer loads with R a multiple of BLOCK_K, and pointer
#: loads with the partial last step peeled ("ragged-r")
PATHS = {"sm_90a": ("tma", "ptr", "ptr ragged-r"), "sm_80": ("ptr", "ptr ragged-r")}


def _linear_variants(arch: str) -> list[Variant]:
    """The fused linear_dot kernel at every config of the one table (``_common.LINEAR_CONFIGS``), in each dot
    mode it serves, each operand layout and each load path of ``arch``; ``launched``: whether the launcher can
    run it on that arch (``_common.linear_configs(mode, arch)``)."""
    from geffect_fast.ops.triton import _common

    out = []
    major = ARCHS[arch] // 10
    for name, c in _common.LINEAR_CONFIGS.items():
        for mode in c.modes:
            for label, xdt, mdt, layouts in LINEAR_MODES[mode]:
                for layout in layouts:
                    for path in PATHS[arch]:
                        tma = path == "tma"
                        if tma and not _common.uses_tma(mode, major):
                            continue  # never launched with TMA descriptors
                        if label == "fp16" and path != PATHS[arch][0]:
                            continue  # the bf16 rows cover the other paths of this code
                        launched = name in _common.linear_configs(mode, major, tma)
                        out.append(_linear_variant(name, c, mode, label, xdt, mdt, layout, path, arch, launched))
    return out


def _linear_variant(name, c, mode, label, xdt, mdt, layout, path, arch, launched) -> Variant:
    tma = path == "tma"
    even = path != "ptr ragged-r"
    m_t = layout == "vT"
    # x1 [N, R] and x2 [N, C] row-major; M is Vᵀ (unit stride over r) or V (unit stride over c)
    ones = ("s11", "s21", "smr" if m_t else "smc")
    types = {"x1_ptr": f"*{xdt}", "x2_ptr": f"*{xdt}", "m_ptr": f"*{mdt}", "scale_ptr": "*fp32", "part_ptr": "*fp32"}
    if tma:
        types["x1_desc"] = f"tensordesc<{xdt}[{c.BLOCK_M}, {c.BLOCK_K}]>"
        blk = f"1, {c.BLOCK_N}, {c.BLOCK_K}" if m_t else f"1, {c.BLOCK_K}, {c.BLOCK_N}"
        types["m_desc"] = f"tensordesc<{mdt}[{blk}]>"
        types["x2_desc"] = f"tensordesc<{xdt}[{c.BLOCK_M}, {c.BLOCK_N}]>"
    else:
        types["x1_desc"], types["m_desc"], types["x2_desc"] = f"*{xdt}", f"*{mdt}", f"*{xdt}"
    divisible = ("x1_ptr", "m_ptr", "x2_ptr", "part_ptr", "s10", "smk", "smr", "smc", "s20", "spk", "spb", "C")
    return Variant(
        kernel="linear_dot._linear_dot_kernel",
        config=f"{name} {c.label()} {label} {layout} {path}",
        types=types,
        constexprs=dict(
            MODE=mode,
            UPCAST=False,
            EVEN_R=even,
            TMA=tma,
            M_T=m_t,
            BLOCK_M=c.BLOCK_M,
            BLOCK_N=c.BLOCK_N,
            BLOCK_K=c.BLOCK_K,
            GROUP_M=c.GROUP_M,
        ),  # fmt: skip
        num_warps=c.num_warps,
        num_stages=c.num_stages,
        ones=ones,
        divisible=divisible + (("R",) if even else ()) + (("x1_desc", "m_desc", "x2_desc") if not tma else ()),
        expect_tensor_cores=mode in (0, 1, 2),
        arch=arch,
        launched=launched,
    )


def _row_variants() -> list[Variant]:
    from geffect_fast.ops.triton import _common

    out = []
    for K in (1, _common.MAX_K_PER_PROGRAM):
        c = _common.rows_config(WIDTH, WIDTH, K)
        tag = f"KP{c.KP} {c.BLOCK_N}x{c.BLOCK_D} w{c.num_warps}"
        out.append(
            Variant(
                "row_dot._row_dot_kernel", f"{tag} p:fp32 x:bf16",
                {"p_ptr": "*fp32", "x_ptr": "*bf16", "out_ptr": "*fp32"},
                dict(KP=c.KP, BLOCK_N=c.BLOCK_N, BLOCK_D=c.BLOCK_D), c.num_warps,
                ones=("sp2", "sx1", "so1"), divisible=("p_ptr", "x_ptr", "out_ptr", "C", "sp0", "sp1", "sx0", "so0"),
            )
        )  # fmt: skip
        out.append(
            Variant(
                "embedding_dot._embedding_dot_kernel", f"{tag} bf16",
                {"ids_ptr": "*i64", "g_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*fp32"},
                dict(KP=c.KP, BLOCK_N=c.BLOCK_N, BLOCK_D=c.BLOCK_D), c.num_warps,
                ones=("sids", "sg1", "sv2"), divisible=("g_ptr", "v_ptr", "out_ptr", "D", "sg0", "sv0", "sv1", "so0"),
            )
        )  # fmt: skip
        c2 = _common.rows_config(WIDTH, WIDTH, K, tiles_per_k=2)
        out.append(
            Variant(
                "norm_dot._norm_dot_kernel", f"KP{c2.KP} {c2.BLOCK_N}x{c2.BLOCK_D} w{c2.num_warps} bf16 weight+bias",
                {"x_ptr": "*bf16", "g_ptr": "*bf16", "vw_ptr": "*bf16", "vb_ptr": "*bf16", "ow_ptr": "*fp32",
                 "ob_ptr": "*fp32"},
                dict(HAS_W=True, HAS_B=True, KP=c2.KP, BLOCK_N=c2.BLOCK_N, BLOCK_D=c2.BLOCK_D), c2.num_warps,
                ones=("sx1", "sg1", "svw1", "svb1"),
                divisible=("x_ptr", "g_ptr", "vw_ptr", "vb_ptr", "ow_ptr", "ob_ptr", "D", "sx0", "sg0", "svw0", "svb0",
                           "so0"),
            )
        )  # fmt: skip
    from geffect_fast.ops.triton.segment_outer import SEGMENT_OUTER_CONFIG

    tok, bu, bw = SEGMENT_OUTER_CONFIG
    out.append(
        Variant(
            "segment_outer._segment_outer_kernel", f"{tok} tokens x {bu}x{bw} w4 bf16 ragged",
            {"u_ptr": "*bf16", "w_ptr": "*bf16", "seg_ptr": "*i64", "out_ptr": "*fp32"},
            dict(TOK=tok, BLOCK_U=bu, BLOCK_W=bw), 4,
            ones=("su1", "sw1", "sseg"), divisible=("u_ptr", "w_ptr", "seg_ptr", "out_ptr", "su0", "sw0"),
        )
    )  # fmt: skip
    return out


def variants() -> list[Variant]:
    """Every (kernel, config) × architecture to compile."""
    rows = _row_variants()
    return [v for arch in ARCHS for v in _linear_variants(arch)] + [
        Variant(**{**v.__dict__, "arch": arch, "result": {}}) for arch in ARCHS for v in rows
    ]


def _ptxas(arch: int) -> str:
    """The ptxas Triton uses for ``arch`` (it emits PTX for that one's version)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError):  # older Triton
        from triton.backends.nvidia.compiler import _path_to_binary

        return _path_to_binary("ptxas")[0]


_TC = re.compile(r"^\s*(?:@%p\d+\s+)?(wgmma\.mma_async|mma\.sync)", re.M)
_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


def compile_one(v: Variant) -> dict:
    """Compile ``v`` with Triton for its arch, assemble with ptxas -v; the numbers as a dict."""
    import triton
    from triton.backends.compiler import GPUTarget

    mod, fn_name = v.kernel.split(".")
    module = importlib.import_module(f"geffect_fast.ops.triton.{mod}")
    fn = getattr(module, fn_name)
    consts = dict(v.constexprs, **{n: 1 for n in v.ones})
    sig = {n: ("constexpr" if n in consts else v.types.get(n, "i32")) for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in v.divisible if n not in consts}
    arch = ARCHS[v.arch]
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": v.num_warps, "num_stages": v.num_stages})
    t0 = time.perf_counter()
    cc = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=target,
                        options=options.__dict__)  # fmt: skip
    ptx = cc.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "k.ptx"
        p.write_text(ptx)
        r = subprocess.run(
            [_ptxas(arch), "-v", f"-arch={v.arch}", str(p), "-o", str(Path(d) / "k.cubin")],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed on {v.kernel} {v.config} {v.arch}: {r.stderr[-800:]}")
    regs = _REGS.search(r.stderr)
    spill = _SPILL.search(r.stderr)
    stack = _STACK.search(r.stderr)
    return {
        "kernel": f"triton:{fn_name.strip('_')}",
        "config": v.config,
        "arch": v.arch,
        "registers": int(regs.group(1)) if regs else None,
        "spill_bytes": int(spill.group(1)) + int(spill.group(2)) if spill else 0,
        "stack_bytes": int(stack.group(1)) if stack else 0,
        "tensor_core_ops": len(_TC.findall(ptx)),
        "shared_bytes": getattr(cc.metadata, "shared", None),
        "expect_tensor_cores": v.expect_tensor_cores,
        "launched": v.launched,
        "compile_s": round(time.perf_counter() - t0, 2),
    }


def _cuobjdump() -> str | None:
    """cuobjdump from PATH or a CUDA install, else the one Triton's package carries."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", *sorted(map(str, Path("/usr/local").glob("cuda-*")))]
    for root in roots:
        if root and (Path(root) / "bin" / "cuobjdump").exists():
            return str(Path(root) / "bin" / "cuobjdump")
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        carried = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if carried.exists():
            return str(carried)
    return None


def cuda_module_path() -> str | None:
    """The built ``geffect_fast._C_cuda`` this interpreter imports, or None. Run from the repository root, a
    non-editable install is shadowed by the source tree (which holds no built module): pass ``--cuda-module``."""
    spec = importlib.util.find_spec("geffect_fast._C_cuda")
    return spec.origin if spec is not None else None


def cuda_module_rows(so: str | None) -> list[dict]:
    """Resource usage of the CUDA module ``so``'s kernels, per architecture (cuobjdump), or [] without one."""
    tool = _cuobjdump()
    if so is None:
        return []
    if tool is None:
        raise SystemExit(f"cuobjdump not found (PATH, CUDA_HOME, /usr/local/cuda, Triton's package): cannot read {so}")
    res = subprocess.run([tool, "-res-usage", so], capture_output=True, text=True, check=False).stdout
    sass = subprocess.run([tool, "-sass", so], capture_output=True, text=True, check=False).stdout
    tc: dict[tuple[str, str], int] = {}
    arch = fn = None
    for line in sass.splitlines():
        m = re.search(r"arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
        m = re.search(r"Function : (\S+)", line)
        if m:
            fn = m.group(1)
        if fn and re.search(r"\b(HMMA|HGMMA)\b", line):
            tc[(arch, fn)] = tc.get((arch, fn), 0) + 1
    rows = []
    arch = None
    lines = res.splitlines()
    for i, line in enumerate(lines):
        m = re.search(r"arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\S+):", line)
        if m and i + 1 < len(lines):
            usage = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", lines[i + 1]))
            name = _demangle(m.group(1))
            rows.append(
                {
                    "kernel": f"cuda:{name}",
                    "config": "compiled",
                    "arch": arch,
                    "registers": int(usage.get("REG", 0)),
                    "spill_bytes": int(usage.get("LOCAL", 0)),
                    "stack_bytes": int(usage.get("STACK", 0)),
                    "tensor_core_ops": tc.get((arch, m.group(1)), 0),
                    "shared_bytes": int(usage.get("SHARED", 0)),
                    "expect_tensor_cores": False,
                    "launched": True,
                }
            )
    return rows


def _demangle(name: str) -> str:
    filt = shutil.which("c++filt")
    if not filt:
        return name
    out = subprocess.run([filt, name], capture_output=True, text=True, check=False).stdout.strip() or name
    out = re.sub(r"^void |\(anonymous namespace\)::|gf::", "", out)
    out = re.sub(r"\([^()]*\)$", "", out)  # the parameter list
    return out[:120]


def problems(rows: list[dict]) -> list[str]:
    """What fails the check, among the launched kernels/configs (``launched`` true: the dispatcher can pick them on
    that arch): a spill; a bf16/fp16 linear_dot config without tensor-core instructions. Rows not launched on an
    arch are reported, never failed."""
    bad = []
    for r in rows:
        if not r.get("launched", True):
            continue
        if r["spill_bytes"]:
            bad.append(f"{r['kernel']} [{r['config']}] on {r['arch']} spills {r['spill_bytes']} bytes")
        if r["expect_tensor_cores"] and not r["tensor_core_ops"]:
            bad.append(f"{r['kernel']} [{r['config']}] on {r['arch']} has no tensor-core instruction")
    return bad


def markdown(rows: list[dict], meta: dict) -> str:
    launched = [r for r in rows if r.get("launched", True)]
    tri = [r for r in launched if r["kernel"] == "triton:linear_dot_kernel"]
    summary = ""
    if tri:
        by_arch = {}
        for r in tri:
            by_arch.setdefault(r["arch"], []).append(r)
        parts = [
            f"{arch}: {len(rs)} launched linear_dot variants, {min(r['registers'] for r in rs)}–"
            f"{max(r['registers'] for r in rs)} registers, {sum(r['spill_bytes'] for r in rs)} spill bytes"
            for arch, rs in by_arch.items()
        ]
        summary = "Launched fused linear_dot configs — " + "; ".join(parts) + ".\n\n"
    head = (
        f"# Static GPU check\n\n`{meta['command']}` — {meta['date']}, no GPU: Triton {meta['triton']} "
        f"(ptxas {meta['ptxas']}), CUDA module from nvcc {meta['nvcc']}. Registers per thread, spill bytes "
        "(stores + loads; local memory for CUDA kernels), tensor-core instructions (PTX wgmma/mma sites for "
        "Triton, SASS HGMMA/HMMA for CUDA), shared memory (bytes, Triton's), launched: whether the dispatcher can "
        "pick it on that arch (only launched rows fail the check).\n\n" + summary +
        "| kernel | config | arch | launched | registers | spill bytes | tensor-core ops | shared bytes |\n"
        "|---|---|---|---|---:|---:|---:|---:|\n"
    )  # fmt: skip
    body = "".join(
        f"| {r['kernel']} | {r['config']} | {r['arch']} | {'yes' if r.get('launched', True) else 'no'} | "
        f"{r['registers']} | {r['spill_bytes']} | {r['tensor_core_ops']} | {r.get('shared_bytes') or ''} |\n"
        for r in rows
    )
    return head + body


def _tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip().splitlines()
        return out[-1].split(",")[-1].strip() if out else "?"
    except OSError:
        return "not found"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the rows here (JSON list)")
    ap.add_argument("--md", type=Path, help="write a Markdown table here")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: CPUs)")
    ap.add_argument("--only", default="", help="compile only kernels whose name contains this")
    ap.add_argument(
        "--launched-only", action="store_true", help="leave out the configs not launched on an arch (CI: faster)"
    )
    ap.add_argument(
        "--cuda-module",
        type=Path,
        help="the built _C_cuda shared object to read (default: the one this interpreter imports, if any)",
    )
    args = ap.parse_args(argv)
    if args.cuda_module is not None and not args.cuda_module.is_file():
        ap.error(f"--cuda-module {args.cuda_module}: no such file")
    so = str(args.cuda_module) if args.cuda_module is not None else cuda_module_path()

    import triton

    todo = [v for v in variants() if args.only in v.kernel and (v.launched or not args.launched_only)]
    t0 = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(compile_one, todo))
    else:
        rows = [compile_one(v) for v in todo]
    cuda_rows = cuda_module_rows(so)
    if so is not None and not cuda_rows:
        print(f"FAIL: no kernel read from the CUDA module {so}", file=sys.stderr)
        return 1
    rows += [r for r in cuda_rows if args.only in r["kernel"]]
    meta = {
        "command": "python -m benchmarks.gpu_static " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "triton": triton.__version__,
        "ptxas": _tool_version([_ptxas(90), "--version"]),
        "nvcc": _tool_version([shutil.which("nvcc") or "nvcc", "--version"]),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    md = markdown(rows, meta)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(md)
    print(md)
    print(f"{len(rows)} kernels/configs in {meta['seconds']} s")
    bad = problems(rows)
    for b in bad:
        print("FAIL:", b, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
