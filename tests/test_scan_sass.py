"""tools/scan_sass.py: the scan kernels compiled for sm_90 without a GPU, their SASS counted."""
import json
import os

import pytest

triton = pytest.importorskip("triton")
if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                   "ptxas")):
    pytest.skip("triton without its NVIDIA backend's ptxas", allow_module_level=True)


def test_counts_of_the_shipped_kernels(tmp_path):
    from tools import scan_sass
    rows = scan_sass.main(["--out", str(tmp_path / "sass.json")])
    assert json.loads((tmp_path / "sass.json").read_text()) == rows
    fwd, bwd, conv_fwd, conv_bwd = rows
    assert [r["kernel"] for r in rows] == ["fwd", "bwd", "conv fwd", "conv bwd"]
    for r in rows:
        assert 0 < r["registers"] <= 255 and r["instructions"] > 100
        # every state update of a tile takes one exponential in each kernel's loop
        assert r["MUFU"] >= r["elements_per_thread"]
    # the backward adds its dB and dC sums atomically; it sums them over channels in registers after one
    # pass through shared memory (ssm_triton._sum_channels), not through lane shuffles, which would take
    # at least one a value a thread holds (the reduce-scatter before session 28: 84 a tile)
    assert bwd["REDG"] >= 1 and bwd["loops"][1]["SHFL"] < bwd["elements_per_thread"]
    # innermost loops: the forward's one, the backward's pre-pass and reverse pass; each takes one
    # exponential per state update of its tile
    assert len(fwd["loops"]) == 1 and len(bwd["loops"]) == 2
    # the conv's SiLU (and, backward, its derivative) is one exponential and one approximate division
    # an element, without the range checks tl.sigmoid compiles to (ssm_triton._silu): the forward's
    # tile has no loop, the backward's one-step loop
    assert conv_fwd["loops"] == [] and conv_fwd["FSETP"] == 0
    assert conv_fwd["MUFU"] == 2 * conv_fwd["elements_per_thread"]
    (loop,) = conv_bwd["loops"]
    assert loop["MUFU"] == 2 * conv_bwd["elements_per_thread"] and loop["FSETP"] == 0
    assert all(loop["MUFU"] >= r["elements_per_thread"] for r in rows for loop in r["loops"])
    prepass, reverse = bwd["loops"]
    assert reverse["instructions"] > prepass["instructions"] and reverse["REDG"] >= 1
    # without knowing that strides are multiples of 16 (x_proj rows of DiM-S/2: 56 elements) each
    # element of a B or C row is its own load, with its own address arithmetic: more loads and more
    # instructions in the forward's loop than the L models' launches compile to
    generic_fwd, generic_bwd = scan_sass.main(["--no-divisible"])[:2]
    assert not generic_fwd["divisible"] and fwd["divisible"]
    assert generic_fwd["loops"][0]["LDG"] > fwd["loops"][0]["LDG"]
    assert generic_fwd["loops"][0]["instructions"] > fwd["loops"][0]["instructions"]
    # that compile's reverse pass spilled nothing from session 19 (A not held twice, only the product
    # a g crossing to the next tile; before, 20 spill loads and 9 stores a tile) until session 28, whose
    # channel sums through shared memory cost it 14 loads and 3 stores (the L models' compile: 24 and
    # 11), timed level at DiM-S/2's shape (README, Speed). Bounded, so that a change spilling the
    # tile's working set shows here.
    assert generic_bwd["loops"][1]["LDL"] + generic_bwd["loops"][1]["STL"] <= 24


def test_a_register_cap_is_applied():
    from tools import scan_sass
    fwd, bwd = scan_sass.main(["--fwd-config", "16,4,1,96", "--bwd-config", "8,4,1,128"])[:2]
    assert fwd["registers"] <= 96 and bwd["registers"] <= 128
    # a cap below what the backward takes uncapped makes it spill to local memory
    assert bwd["LDL"] > 0 and bwd["STL"] > 0


def test_segmented_launches_compile():
    # The GPU cuts long scans into segments (MODE 1: summaries, MODE 2: the segments from the composed
    # carries); the CPU tests run the kernels interpreted with one segment, and the interpreter does not
    # hold loop-carried values to one type, which the compiler does (session 28: a name reused inside
    # the backward's MODE 2 loop compiled only on the GPU). Compiling both modes here catches that.
    import ssm_triton
    from tools import scan_sass
    for kernel, cfg in ((ssm_triton._scan_fwd_kernel, ssm_triton.TRITON_CONFIG["fwd"][2]),
                        (ssm_triton._scan_bwd_kernel, ssm_triton.TRITON_CONFIG["bwd"][2])):
        for mode in (1, 2):
            constants = dict(scan_sass.FLAGS, MODE=mode, NP=16, BD=cfg["BD"], T=cfg["T"], CHUNK=64)
            row = scan_sass.count(scan_sass.compile_kernel(kernel, constants, cfg["num_warps"], 90))
            assert row["instructions"] > 100
