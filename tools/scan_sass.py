"""
What the scan kernels compile to, without a GPU: ssm_triton's forward and backward kernels (and the
conv's, at their shipped launch) compiled for an NVIDIA architecture (sm_90 by default) with Triton's
own ptxas, and their machine code (SASS) counted: registers per thread, spilled bytes, instructions,
and the instruction kinds that matter for the scan (MUFU: exponentials and other special functions;
SHFL: cross-lane moves, which the backward's sums of dB and dC over channels need; FFMA/FMUL/FADD:
fp32 arithmetic; FSETP: fp32 compares, among them the range checks of exact sigmoids and divisions;
LDG/STG: global loads and stores; REDG: the backward's atomic adds; LDL/STL: spills to local memory).
The same counts for each innermost loop (one tile an iteration): where the time goes, and where a
spill costs it.

    python -m tools.scan_sass                             # the shipped launch configurations, bf16
    python -m tools.scan_sass --bwd-config 8,4,1          # BD channels, T steps, warps of the backward
    python -m tools.scan_sass --bwd-config 8,4,1,128      # ... with at most 128 registers (ptxas' maxnreg)
    python -m tools.scan_sass --arch 100 --out sass.json  # another architecture; JSON
    python -m tools.scan_sass --no-divisible              # strides not known to be multiples of 16

Counts are static (each instruction once, the loop body once), so they compare code, not time: with
one warp per scheduler (these kernels at the models' shapes: Nsight Compute, docs/speed_history.md,
session 22) the schedule and its stalls decide as much as the count, and a kernel can speed up or slow down with the
same counts. Use it to see register pressure and spills before spending GPU time; time on
the GPU with tools/scan_bench.py. Needs triton with its NVIDIA backend (the pip wheel bundles ptxas
and nvdisasm); no GPU and no CUDA driver.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import ssm_triton

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
KINDS = ["MUFU", "SHFL", "FFMA", "FMUL", "FADD", "FSETP", "LDG", "STG", "REDG", "LDL", "STL"]
# the fused options DiM's layers use: an order table, D, the z gate, the delta bias and softplus
FLAGS = dict(HAS_IDX=True, HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, FAST=True)
# unit strides of the token layout (channels and states are contiguous): Triton specialises them
UNIT_STRIDES = {"su_d", "sd_d", "sz_d", "so_d", "sB_n", "sC_n", "sx_d"}
# integer arguments a launch does not see as multiples of 16 (compile_kernel's divisible)
GENERIC_INTS = {"L", "n_chunks", "seg_chunks", "n_seg"}
FP32_POINTERS = {"A_ptr", "D_ptr", "bias_ptr", "st_ptr", "scr_ptr", "dB_ptr", "dC_ptr", "dA_ptr",
                 "dD_ptr", "dbias_ptr", "sum_ptr", "w_ptr", "b_ptr", "dw_ptr", "db_ptr"}


def compile_kernel(kernel, constants, num_warps, arch, dtype="bf16", maxnreg=None, divisible=True):
    """The kernel compiled for sm_<arch>: every pointer 16-byte aligned, activations in `dtype`, the
    unit strides specialised as a launch on the models' tensors would. divisible: the other integer
    arguments but the sequence's length and chunk counts marked as multiples of 16, as Triton's launch
    marks any that is (the L models' row strides, channels and state size are: DiM-L/2's x_proj rows
    are 64 + 2 x 16 elements); the loads of B and C rows then become vector loads. False: no such
    knowledge (DiM-S/2's x_proj rows are 24 + 32 elements)."""
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constants or name in UNIT_STRIDES:
            signature[name] = "constexpr"
            constexprs[(i,)] = constants.get(name, 1)
        elif name.endswith("_ptr"):
            signature[name] = "*i32" if name == "idx_ptr" else "*fp32" if name in FP32_POINTERS \
                else "*" + dtype
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if divisible and name not in GENERIC_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=num_warps, **ssm_triton.FUSE_FMA, **({"maxnreg": maxnreg} if maxnreg else {}))
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def count(compiled):
    """Registers, spill bytes and instruction counts of a compiled kernel's SASS."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", path], check=True,
                               capture_output=True, text=True).stdout
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", path], check=True,
                              capture_output=True, text=True).stdout
    # an instruction line: /*0a30*/ [@P0] OPCODE.MODIFIERS operands ;
    code = [(int(m.group(1), 16), m.group(2).split(".")[0], m.group(3)) for m in
            re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;\n]*)", sass)]
    opcodes = [op for _, op, _ in code]
    row = dict(registers=int(re.search(r"REG:(\d+)", usage).group(1)),
               spill_bytes=int(re.search(r"STACK:(\d+)", usage).group(1)), instructions=len(opcodes))
    row.update({kind: opcodes.count(kind) for kind in KINDS})
    row["loops"] = [dict(instructions=len(body), **{kind: body.count(kind) for kind in KINDS})
                    for body in innermost_loops(sass, code)]
    return row


def innermost_loops(sass, code):
    """Opcodes of each innermost loop body, in address order: a loop is a branch back to a label at
    a lower address; innermost if it contains no other loop (the backward: its pre-pass, then its
    reverse pass; the forward: its one loop)."""
    labels, pending = {}, None
    for line in sass.splitlines():  # a label line, then the address of the instruction under it
        label = re.match(r"\s*(\.L_x_\d+):", line)
        address = re.search(r"/\*([0-9a-f]{4,})\*/", line)
        if label:
            pending = label.group(1)
        elif address and pending:
            labels[pending], pending = int(address.group(1), 16), None
    loops = []
    for address, op, operands in code:
        target = re.search(r"(\.L_x_\d+)", operands) if op == "BRA" else None
        if target and labels.get(target.group(1), address) < address:
            loops.append((labels[target.group(1)], address))
    inner = [(lo, hi) for lo, hi in loops
             if not any(lo <= lo2 and hi2 <= hi and (lo2, hi2) != (lo, hi) for lo2, hi2 in loops)]
    return [[op for address, op, _ in code if lo <= address <= hi] for lo, hi in sorted(set(inner))]


def config(text):
    """BD,T,warps or BD,T,warps,maxnreg (a cap on registers per thread)."""
    values = [int(v) for v in text.split(",")]
    if len(values) not in (3, 4):
        raise argparse.ArgumentTypeError(f"{text}: expected BD,T,warps[,maxnreg]")
    return dict(BD=values[0], T=values[1], num_warps=values[2],
                maxnreg=values[3] if len(values) == 4 else None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    shipped = {k: ssm_triton.TRITON_CONFIG[k][2] for k in ("fwd", "bwd")}
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default: 90, Hopper)")
    p.add_argument("--state", type=int, default=16, help="state size N (default: 16, every model's)")
    for which in ("fwd", "bwd"):
        c = shipped[which]
        p.add_argument(f"--{which}-config", type=config, default=dict(c),
                       help=f"BD,T,warps[,maxnreg] (default: the shipped bf16 one, {c['BD']},{c['T']},"
                            f"{c['num_warps']})")
    p.add_argument("--no-divisible", dest="divisible", action="store_false",
                   help="compile without knowing that strides, channels and state size are multiples "
                        "of 16 (the default knows, as a launch on the L models' tensors does)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    NP = max(triton.next_power_of_2(args.state), 2)
    rows = []
    for which, kernel in (("fwd", ssm_triton._scan_fwd_kernel), ("bwd", ssm_triton._scan_bwd_kernel)):
        c = getattr(args, f"{which}_config")
        # MODE 0: the whole sequence in one program (the segments' passes share its loop)
        constants = dict(FLAGS, MODE=0, NP=NP, BD=c["BD"], T=c["T"], CHUNK=ssm_triton.CHUNK)
        row = dict(kernel=which, arch=args.arch, **c, state=args.state, divisible=args.divisible,
                   elements_per_thread=c["BD"] * c["T"] * NP // (32 * c["num_warps"]))
        row.update(count(compile_kernel(kernel, constants, c["num_warps"], args.arch,
                                        maxnreg=c.get("maxnreg"), divisible=args.divisible)))
        rows.append(row)
    # the causal conv + SiLU at its shipped launch (the forward: a tile of S steps x BD channels a
    # program; the backward: S steps of BD channels; the T column), with an order table, a bias and
    # DiM's width 3
    for which, kernel in (("conv fwd", ssm_triton._conv_fwd_kernel),
                          ("conv bwd", ssm_triton._conv_bwd_kernel)):
        c = ssm_triton.CONV_CONFIG[which.split()[1]]
        constants = dict(HAS_IDX=True, HAS_BIAS=True, W=3, S=c["S"], BD=c["BD"], FAST=True)
        row = dict(kernel=which, arch=args.arch, BD=c["BD"], T=c["S"], num_warps=c["num_warps"],
                   maxnreg=None, state=None, divisible=args.divisible,
                   elements_per_thread=c["BD"] * (c["S"] if which == "conv fwd" else 1)
                   // (32 * c["num_warps"]))
        row.update(count(compile_kernel(kernel, constants, c["num_warps"], args.arch,
                                        divisible=args.divisible)))
        rows.append(row)
    print("| kernel | BD, T (conv: S), warps | elements per thread | registers | spilled bytes | "
          "instructions | "
          + " | ".join(KINDS) + " |")
    print("|---" * (6 + len(KINDS)) + "|")
    for r in rows:
        print(f"| {r['kernel']} | {r['BD']}, {r['T']}, {r['num_warps']} | {r['elements_per_thread']} | "
              f"{r['registers']} | {r['spill_bytes']} | {r['instructions']} | "
              + " | ".join(str(r[k]) for k in KINDS) + " |")
    print("\nInnermost loops (one tile per iteration; the backward's pre-pass, then its reverse pass; "
          "the conv's backward: one step; its forward has none):\n")
    print("| kernel | loop | instructions | " + " | ".join(KINDS) + " |")
    print("|---" * (3 + len(KINDS)) + "|")
    for r in rows:
        for i, loop in enumerate(r["loops"]):
            print(f"| {r['kernel']} | {i + 1} | {loop['instructions']} | "
                  + " | ".join(str(loop[k]) for k in KINDS) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
