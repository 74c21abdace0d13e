"""DiT baseline: parameter counts and GFLOPs against the paper, shapes, positional embedding, bad
input, the official key mapping."""
import pytest
import torch
import torch.nn as nn

import dit
from tools import bench


def build_meta(name, **kwargs):
    with torch.device("meta"):
        return dit.DiT_models[name](**kwargs)


def n_params(model):
    return sum(p.numel() for p in model.parameters())



@pytest.mark.parametrize("name, millions", [("DiT-XL/2", 675), ("DiT-L/2", 458), ("DiT-B/2", 130),
                                            ("DiT-S/2", 33)])
def test_param_counts_match_the_paper(name, millions):
    # DiT Table 4 (rounded to 1M): within 0.5% for XL, within rounding for the others
    tolerance = 0.005 if name == "DiT-XL/2" else 0.01
    assert n_params(build_meta(name)) / 1e6 == pytest.approx(millions, rel=tolerance)


def test_param_count_equals_official_model():
    # The official DiT-XL/2 has 675,129,632 parameters, 256 x 1152 of them its stored (frozen)
    # positional table, which this model computes on the fly instead.
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
    # not all zeros, so the output depends on the input
    nn.init.normal_(model.final_layer.linear.weight)
    N = shape[0]
    out = model(torch.randn(shape), torch.randint(0, 1000, (N,)), torch.randint(0, 10, (N,)))
    assert out.shape == (N, 8, *shape[2:])
    assert torch.isfinite(out).all()
    # scalar t, null class
    assert model(torch.randn(shape), torch.tensor(5), None).shape == out.shape


def test_patch_4_and_attributes():
    model = dit.DiT(input_size=16, patch_size=4, hidden_size=32, depth=1, num_heads=2,
                    num_classes=3)
    assert model(torch.randn(2, 4, 16, 8), torch.zeros(2, dtype=torch.long)).shape == (2, 8, 16, 8)
    assert (model.in_channels, model.out_channels, model.patch_size, model.num_classes,
            model.input_size) == \
        (4, 8, 4, 3, 16)
    assert (dit.DiT.objective, dit.DiT.schedule, dit.DiT.time_offset) == ("eps", "linear", 0)
    assert set(dit.DiT.train_defaults) == {"lr", "weight_decay", "betas", "eps", "warmup",
                                           "grad_clip", "label_dropout", "ema"}


def test_adaln_zero_init_gives_zero_output():
    model = dit.DiT_T_2(input_size=8)
    assert torch.count_nonzero(model(torch.randn(2, 4, 8, 8), torch.tensor([0, 999]),
                                     torch.tensor([1, 2]))) == 0


@pytest.mark.parametrize("shape", [(1, 4, 15, 16), (1, 4, 16, 9), (1, 3, 16, 16), (4, 16, 16)])
def test_bad_shape_raises(shape):
    model = dit.DiT_T_2(input_size=16)
    with pytest.raises(ValueError, match="multiples of 2"):
        model(torch.randn(shape), torch.zeros(shape[0], dtype=torch.long))


def test_pos_embed_layout():
    # (h*w, D), row-major; channels [sin(col w), cos(col w), sin(row w), cos(row w)], w_k =
    # 10000^(-k / (D/4))
    D, h, w = 8, 2, 3
    emb = dit.get_2d_sincos_pos_embed(D, h, w)
    assert emb.shape == (h * w, D)
    omega = torch.tensor([1.0, 0.01])
    for i in range(h):
        for j in range(w):
            expect = torch.cat([torch.sin(j * omega), torch.cos(j * omega), torch.sin(i * omega),
                                torch.cos(i * omega)])
            torch.testing.assert_close(emb[i * w + j], expect)


def test_official_state_dict_loads():
    model = dit.DiT_T_2(input_size=8)
    official = {"module." + k: v.clone() for k, v in model.state_dict().items()}
    official["pos_embed"] = torch.zeros(1, 16, 64)
    other = dit.DiT_T_2(input_size=8)
    dit.load_official_state_dict(other, official)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 other.state_dict().values()))
