"""DiT baseline (parameter counts and GFLOPs against the paper, shapes, positional embedding, bad input) and
bench.py on the CPU with tiny models (every column in the JSON, the plot, n/a and OOM rows)."""
import json
import sys
import types

import pytest
import torch
import torch.nn as nn

import bench
import dit


def build_meta(name, **kwargs):
    with torch.device("meta"):
        return dit.DiT_models[name](**kwargs)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


#################################################################################
#                                      DiT                                      #
#################################################################################

@pytest.mark.parametrize("name, millions", [("DiT-XL/2", 675), ("DiT-L/2", 458), ("DiT-B/2", 130), ("DiT-S/2", 33)])
def test_param_counts_match_the_paper(name, millions):
    # DiT Table 4 (rounded to 1M): within 0.5% for XL, within rounding for the others
    tolerance = 0.005 if name == "DiT-XL/2" else 0.01
    assert n_params(build_meta(name)) / 1e6 == pytest.approx(millions, rel=tolerance)


def test_param_count_equals_official_model():
    # The official DiT-XL/2 has 675,129,632 parameters, 256 x 1152 of them its stored (frozen) positional table,
    # which this model computes on the fly instead.
    assert n_params(build_meta("DiT-XL/2")) + 256 * 1152 == 675_129_632


@pytest.mark.parametrize("name, res, gflops", [("DiT-XL/2", 256, 118.64), ("DiT-XL/2", 512, 524.6),
                                               ("DiT-L/2", 256, 80.71), ("DiT-B/2", 256, 23.01),
                                               ("DiT-S/2", 256, 6.06), ("DiT-XL/4", 256, 29.05)])
def test_gflops_match_the_paper(name, res, gflops):
    total, scan = bench.count_gmacs(build_meta(name, input_size=res // 8), res // 8)
    assert total == pytest.approx(gflops, rel=0.02)
    assert scan == 0


@pytest.mark.parametrize("shape", [(2, 4, 16, 16), (1, 4, 8, 24), (3, 4, 2, 2), (1, 4, 32, 32)])
def test_forward_shapes(shape):
    torch.manual_seed(0)
    model = dit.DiT_T_2(input_size=16, num_classes=10)
    nn.init.normal_(model.final_layer.linear.weight)   # not all zeros, so the output depends on the input
    N = shape[0]
    out = model(torch.randn(shape), torch.randint(0, 1000, (N,)), torch.randint(0, 10, (N,)))
    assert out.shape == (N, 8, *shape[2:])
    assert torch.isfinite(out).all()
    assert model(torch.randn(shape), torch.tensor(5), None).shape == out.shape   # scalar t, null class


def test_patch_4_and_attributes():
    model = dit.DiT(input_size=16, patch_size=4, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    assert model(torch.randn(2, 4, 16, 8), torch.zeros(2, dtype=torch.long)).shape == (2, 8, 16, 8)
    assert (model.in_channels, model.out_channels, model.patch_size, model.num_classes, model.input_size) == \
        (4, 8, 4, 3, 16)
    assert (dit.DiT.objective, dit.DiT.schedule, dit.DiT.time_offset) == ("eps", "linear", 0)
    assert set(dit.DiT.train_defaults) == {"lr", "weight_decay", "betas", "eps", "warmup", "grad_clip",
                                           "label_dropout", "ema"}


def test_adaln_zero_init_gives_zero_output():
    model = dit.DiT_T_2(input_size=8)
    assert torch.count_nonzero(model(torch.randn(2, 4, 8, 8), torch.tensor([0, 999]), torch.tensor([1, 2]))) == 0


@pytest.mark.parametrize("shape", [(1, 4, 15, 16), (1, 4, 16, 9), (1, 3, 16, 16), (4, 16, 16)])
def test_bad_shape_raises(shape):
    model = dit.DiT_T_2(input_size=16)
    with pytest.raises(ValueError, match="multiples of 2"):
        model(torch.randn(shape), torch.zeros(shape[0], dtype=torch.long))


def test_pos_embed_layout():
    # (h*w, D), row-major; channels [sin(col w), cos(col w), sin(row w), cos(row w)], w_k = 10000^(-k / (D/4))
    D, h, w = 8, 2, 3
    emb = dit.get_2d_sincos_pos_embed(D, h, w)
    assert emb.shape == (h * w, D)
    omega = torch.tensor([1.0, 0.01])
    for i in range(h):
        for j in range(w):
            expect = torch.cat([torch.sin(j * omega), torch.cos(j * omega), torch.sin(i * omega), torch.cos(i * omega)])
            torch.testing.assert_close(emb[i * w + j], expect)


def test_official_state_dict_loads():
    model = dit.DiT_T_2(input_size=8)
    official = {"module." + k: v.clone() for k, v in model.state_dict().items()}
    official["pos_embed"] = torch.zeros(1, 16, 64)
    other = dit.DiT_T_2(input_size=8)
    dit.load_official_state_dict(other, official)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


#################################################################################
#                                     bench                                     #
#################################################################################

class OOMModel(nn.Module):
    """Stands in for a model that does not fit: its forward raises the CUDA out-of-memory error."""
    patch_size, num_classes = 2, 1000

    def __init__(self, **kwargs):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3))

    def forward(self, x, t, y=None):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")


@pytest.fixture
def extra_families(monkeypatch):
    monkeypatch.setitem(bench.FAMILIES, "ghost", ("ghost_model_file_that_does_not_exist", "Ghost_models",
                                                  "Ghost-{}/2", {}))
    module = types.ModuleType("oomfam")
    module.OOM_models = {"OOM-T/2": OOMModel}
    monkeypatch.setitem(sys.modules, "oomfam", module)
    monkeypatch.setitem(bench.FAMILIES, "oomfam", ("oomfam", "OOM_models", "OOM-{}/2", {}))


@pytest.mark.parametrize("mode", ["train", "sample"])
def test_bench_cpu_tiny(tmp_path, capsys, extra_families, mode):
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    bench.main(["--models", "dim,dit,ghost,oomfam", "--size", "T", "--res", "32,64", "--batch", "2,1",
                "--repeats", "1", "--warmup", "0", "--mode", mode, "--out", str(out), "--plot", str(plot)])
    rows = json.loads(out.read_text())
    assert all(set(r) == set(bench.COLUMNS) for r in rows)
    status = {(r["model"], r["res"]): r["status"] for r in rows}
    assert status == {("DiM-T/2", 32): "ok", ("DiM-T/2", 64): "ok", ("DiT-T/2", 32): "ok", ("DiT-T/2", 64): "ok",
                      ("Ghost-T/2", None): "n/a (ghost_model_file_that_does_not_exist.py not found)",
                      ("OOM-T/2", 32): "OOM", ("OOM-T/2", 64): "OOM*"}
    for r in rows:
        assert r["mode"] == mode and r["device"] == "cpu" and r["scan"] == "torch"
        if r["status"] == "ok":
            assert r["tokens"] == (r["res"] // 16) ** 2 and r["params_M"] > 0 and r["gflops"] > 0
            assert r["step_ms"] > 0 and r["images_per_s"] == pytest.approx(r["batch"] * 1e3 / r["step_ms"])
            assert r["ms_per_image"] == pytest.approx(r["step_ms"] / r["batch"])
    assert next(r for r in rows if r["model"] == "DiM-T/2")["scan_gflops"] > 0   # the scan stub was counted
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| DiT-T/2 | 64 | 16 | 1 |" in printed and "| OOM-T/2 | 32 |" in printed


def test_scaling_exponent_and_crossover():
    assert bench.scaling_exponent([(1e3, 1.0), (4e3, 16.0), (16e3, 256.0), (10, 99.0)]) == pytest.approx(2.0)

    def row(model, res, ms, status="ok"):
        return dict(model=model, res=res, ms_per_image=ms, status=status)
    rows = [row("M", 256, 2.0), row("D", 256, 1.0), row("M", 512, 3.0), row("D", 512, 4.0),
            row("M", 1024, 5.0), row("D", 1024, None, "OOM")]
    assert bench.crossover(rows, "M", "D", "ms_per_image") == "512"
    assert bench.crossover(rows[:2], "M", "D", "ms_per_image") == "never"
