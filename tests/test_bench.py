"""tools/bench.py on the CPU with tiny models: every column in the JSON, the plot, OOM rows, the
scaling fit."""
import json

import pytest
import torch
import torch.nn as nn

import models
from tools import bench

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: conftest.one_thread


class OOMModel(nn.Module):
    """Stands in for a model that does not fit: its forward raises the CUDA out-of-memory error."""
    patch_size, num_classes = 2, 1000

    def __init__(self, **kwargs):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3))

    def forward(self, x, t, y=None):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")


@pytest.fixture
def oom_family(monkeypatch):
    monkeypatch.setitem(models.MODELS, "OOM-T/2", OOMModel)
    monkeypatch.setitem(bench.FAMILIES, "oom", ("OOM-{}/2", {}))


# eager (the compiled path: test_each_compiled_row_is_compiled_for_its_own_static_shape)
@pytest.mark.parametrize("mode", ["train", "sample"])
def test_bench_cpu_tiny(tmp_path, capsys, oom_family, mode):
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    bench.main(["--models", "dim,dit,oom", "--size", "T", "--res", "32,64", "--batch", "2,1",
                "--repeats", "1", "--warmup", "0", "--mode", mode, "--out", str(out), "--plot",
                str(plot)])
    rows = json.loads(out.read_text())
    assert all(set(r) == set(bench.COLUMNS) for r in rows)
    status = {(r["model"], r["res"]): r["status"] for r in rows}
    assert status == {("DiM-T/2", 32): "ok", ("DiM-T/2", 64): "ok", ("DiT-T/2", 32): "ok",
                      ("DiT-T/2", 64): "ok", ("OOM-T/2", 32): "OOM", ("OOM-T/2", 64): "OOM*"}
    for r in rows:
        assert r["mode"] == mode and r["device"] == "cpu" and r["scan"] == "torch"
        if r["status"] == "ok":
            assert r["compiled"] == "no"  # --compile auto: nothing on a CPU
            assert r["tokens"] == (r["res"] // 16) ** 2 and r["params_M"] > 0 and r["gflops"] > 0
            assert r["step_ms"] > 0 and r["images_per_s"] == pytest.approx(r["batch"] * 1e3 / r["step_ms"])
            assert r["ms_per_image"] == pytest.approx(r["step_ms"] / r["batch"])
            assert r["setup_s"] > 0  # building, compiling and warming up (untimed)
    # the scans were counted
    assert next(r for r in rows if r["model"] == "DiM-T/2")["scan_gflops"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| DiT-T/2 | 64 | 16 | 1 |" in printed and "| OOM-T/2 | 32 |" in printed


def test_each_compiled_row_is_compiled_for_its_own_static_shape(tmp_path, monkeypatch,
                                                                 graph_counter):
    # a training run compiles for one resolution; so must each row. Without a reset between rows,
    # Dynamo saw the first row's shapes under the same forward and compiled the second for dynamic
    # sizes (shape-generic kernels that no training run uses).
    # (Dynamo traces as on a GPU; the graphs run eagerly, without Inductor's C++ builds)
    recording, graphs = graph_counter
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile(fn, backend=recording))
    out = tmp_path / "bench.json"
    bench.main(["--models", "dim,dit", "--size", "T", "--res", "32,64", "--batch", "1",
                "--repeats", "1", "--warmup", "1", "--compile", "dit", "--device", "cpu", "--out",
                str(out), "--plot", ""])
    rows = json.loads(out.read_text())
    assert [(r["model"], r["compiled"], r["status"]) for r in rows] == [
        ("DiM-T/2", "no", "ok"), ("DiM-T/2", "no", "ok"), ("DiT-T/2", "model", "ok"),
        ("DiT-T/2", "model", "ok")]
    symbolic = [any(isinstance(d, torch.SymInt) for n in gm.graph.nodes if n.op == "placeholder"
                    for d in getattr(n.meta.get("example_value"), "shape", ()))
                for gm in graphs]
    assert symbolic == [False, False]


def test_profile_categories():
    cat = bench.profile_category
    assert cat("_scan_bwd_kernel") == cat("void selective_scan_bwd_kernel<...>") == "scan backward"
    assert cat("_scan_fwd_kernel") == cat("diffmamba::scan_cpu") == "scan forward"
    assert cat("diffmamba::scan_cpu_backward") == "scan backward"
    assert cat("_conv_bwd_kernel") == cat("aten::mkldnn_convolution") == "depthwise conv"
    assert cat("_dwconv_bwd_dx_kernel") == cat("diffmamba::dwconv_silu") == "depthwise conv"
    assert cat("sm90_xmma_gemm_bf16bf16_bf16f32") == cat("pytorch_flash::flash_fwd_kernel") \
        == cat("aten::addmm") == "matrix products"
    assert cat("void at::native::index_elementwise_kernel<...>") == cat("aten::copy_") \
        == cat("CatArrayBatchedCopy") == "copies, transposes, gathers"
    assert cat("triton_poi_fused__to_copy_add_mul_0") == cat("aten::silu") == "elementwise"


def test_bench_profile_on_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--models", "DiM-T/2", "--res", "32", "--batch", "2", "--repeats", "2", "--warmup",
                "1", "--compile", "none", "--profile", "--out", str(out), "--plot", ""])
    prof = json.loads(out.read_text())[0]["profile"]
    fractions = {k: v for k, v in prof.items() if k not in ("busy_ms", "top")}
    assert set(fractions) == {c for c, _ in bench.PROFILE_CATEGORIES} and prof["busy_ms"] > 0
    assert sum(fractions.values()) == pytest.approx(1.0)
    # a DiM step spends time in its scans (forward and backward) and its linear layers
    assert fractions["scan forward"] > 0 and fractions["scan backward"] > 0
    assert fractions["matrix products"] > 0
    # the largest operators, largest first, each with its category; none larger than the busy time
    ms = [k[2] for k in prof["top"]]
    assert ms == sorted(ms, reverse=True) and 0 < ms[0] <= prof["busy_ms"]
    assert {k[1] for k in prof["top"]} <= set(fractions)
    printed = capsys.readouterr().out
    assert "| DiM-T/2, 32 px, 2 |" in printed and "Largest kernels, DiM-T/2 at 32 px" in printed


def test_scaling_exponent_and_crossover():
    assert bench.scaling_exponent([(1e3, 1.0), (4e3, 16.0), (16e3, 256.0),
                                   (10, 99.0)]) == pytest.approx(2.0)

    def row(model, res, ms, status="ok"):
        return dict(model=model, res=res, ms_per_image=ms, status=status)
    rows = [row("M", 256, 2.0), row("D", 256, 1.0), row("M", 512, 3.0), row("D", 512, 4.0),
            row("M", 1024, 5.0), row("D", 1024, None, "OOM")]
    assert bench.crossover(rows, "M", "D", "ms_per_image") == "512"
    assert bench.crossover(rows[:2], "M", "D", "ms_per_image") == "never"


def test_unknown_model_is_one_line():
    with pytest.raises(SystemExit, match="unknown model 'DiM-Q/2'"):
        bench.resolve("DiM-Q/2", "L")


def test_cuda_graph_on_without_a_gpu_is_one_line(tmp_path):
    # (auto, the default, runs eagerly on a CPU: test_bench_cpu_tiny's rows say "no")
    with pytest.raises(SystemExit, match="--cuda-graph on needs a CUDA GPU"):
        bench.main(["--models", "dit", "--size", "T", "--res", "32", "--device", "cpu", "--cuda-graph",
                    "on", "--out", str(tmp_path / "bench.json")])


def test_compile_blocks_gives_each_block_shape_a_static_graph(graph_counter):
    # blocks of one model that differ in shape (LaMamba's U-Net stages) get one static graph each,
    # not a graph for symbolic sizes once Dynamo has seen two shapes under the same forward
    class TinyBlock(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.fc = nn.Linear(dim, dim)

        def forward(self, x):
            return x + self.fc(x).relu()

    counting_backend, graphs = graph_counter
    model = nn.Sequential(TinyBlock(8), nn.Linear(8, 16), TinyBlock(16), nn.Linear(16, 32),
                          TinyBlock(32))
    assert models.compile_blocks(model, backend=counting_backend) == 3
    model(torch.randn(2, 8)).sum().backward()
    sizes = [d for gm in graphs for n in gm.graph.nodes if n.op == "placeholder"
             for d in n.meta["example_value"].shape]
    assert len(graphs) == 3 and all(isinstance(d, int) for d in sizes)


@pytest.mark.parametrize("name", ["DiM-T/2", "BiDiM-T/2", "DiMSUM-T/2", "LaMamba-T"])
def test_compile_blocks_matches_eager(name):
    # regional compilation (bench.py --compile blocks) wraps every outermost block once, and the
    # modules between them (models.BETWEEN_BLOCKS) on their own, and leaves
    # outputs and gradients unchanged (dynamo's graphs, fullgraph: no break; no C++ compiler needed)
    torch.manual_seed(0)
    model = models.build_model(name, input_size=8, in_channels=1, num_classes=10)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 10])
    results = []
    for compiled in (False, True):
        if compiled:
            n = models.compile_blocks(model, backend="eager", fullgraph=True)
            blocks = [m for m in model.modules() if type(m).__name__.endswith("Block")]
            assert n == len(blocks) > 0
            between = [m for m in model.modules() if type(m).__name__ in models.BETWEEN_BLOCKS]
            assert all(m._compiled_call_impl is not None for m in between)
            # LaMamba: stem, two merges, three expands, the head's norm; BiDiM and DiMSUM: DiT's
            # PatchEmbed and FinalLayer; DiM: its stem and head are plain layers in its forward
            assert len(between) == {"LaMamba-T": 7, "DiM-T/2": 0}.get(name, 2)
        model.zero_grad()
        out = model(x, t, y)
        out.square().mean().backward()
        results.append([out.detach()] + [p.grad.clone() for p in model.parameters()
                                         if p.grad is not None])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grad_checkpoint_runs_each_compiled_block_again_in_the_backward():
    # --grad-checkpoint with --compile: the checkpoint stays eager around each compiled block and
    # runs the block's graph again in the backward. Compiled around the checkpoint instead, Inductor
    # kept every activation of a DiM-L/2 block on a GPU (docs/speed_history.md, session 21).
    calls = []

    def counting_backend(gm, example_inputs):
        def run(*args):
            calls.append(gm)
            return gm.forward(*args)
        return run

    torch.manual_seed(0)
    model = models.build_model("DiM-T/2", input_size=8, in_channels=1, num_classes=10)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 10])
    model(x, t, y).square().mean().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    n = models.checkpoint_blocks(model)
    assert models.compile_blocks(model, backend=counting_backend, fullgraph=True) == n > 0
    loss = model(x, t, y).square().mean()
    assert len(calls) == n  # one graph call a block in the forward ...
    loss.backward()
    assert len(calls) == 2 * n  # ... and one more in the backward
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
