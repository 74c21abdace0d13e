"""DiM tests: the official-output fidelity check, shapes at any grid, scan orders, pads, configs,
bad input."""
import pytest
import torch

import dim

# ------------------------------------------------------------------------------------------------------
# Fidelity: the official Mamba2DModel's recorded output on known weights
# ------------------------------------------------------------------------------------------------------

def test_dim_matches_official_output(fidelity, relative_error):
    tensors, meta = fidelity("dim_small")
    cfg = meta["config"]
    model = dim.DiM(input_size=cfg["sample_size"], patch_size=cfg["patch_size"],
                    in_channels=cfg["in_channels"],
                    hidden_size=cfg["num_attention_heads"] * cfg["attention_head_dim"],
                    depth=cfg["num_layers"],
                    num_classes=cfg["num_embeds_ada_norm"], d_state=cfg["mamba_d_state"],
                    d_conv=cfg["mamba_d_conv"])
    official = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    loaded, missing, unused = dim.load_official_state_dict(model, official)
    assert missing == [] and unused == [], (missing, unused)
    model.eval()
    with torch.no_grad():
        out = model(tensors["input.x"], tensors["input.t"], tensors["input.y"])
    # The recording is itself float32: our model in float32 and in float64 differ by 3.0e-5 relative
    # (the time sinusoid at t = 640 alone loses ~4e-5 absolute in float32), so agreement can only be
    # that close.
    err = relative_error(out, tensors["output"])
    assert err < 5e-5, f"relative error {err:.2e} against the official output"
    # The check can fail: a 10% change to the pad tokens moves the output well past the tolerance.
    with torch.no_grad():
        model.pad_tokens.mul_(1.1)
        assert relative_error(model(tensors["input.x"], tensors["input.t"], tensors["input.y"]),
                              tensors["output"]) > 1e-4


# ------------------------------------------------------------------------------------------------------
# Structure
# ------------------------------------------------------------------------------------------------------

def test_scan_schedule_matches_official_rule():
    # 49 layers (L, H): row-forward 13 times, each other order 12 times, layer 48 row-major (the
    # official schedule, tyshiwo1/DiM-DiffusionMamba).
    orders = dim.scan_schedule(49)
    assert orders[0] == 0 and orders[48] == 0
    assert [orders.count(k) for k in range(4)] == [13, 12, 12, 12]
    # Layer K+k scans in the order of layer K-k, so each long skip joins a stream in its own order.
    assert all(orders[24 + k] == orders[24 - k] for k in range(1, 25))
    assert dim.scan_schedule(5) == [0, 1, 2, 1, 0]


def test_scan_permutations_are_the_four_orders():
    # 3 x 4 padded grid
    row, row_rev, col, col_rev = dim.scan_permutations(2, 3, pad=1, device="cpu")
    assert row.tolist() == list(range(12))
    assert row_rev.tolist() == list(range(11, -1, -1))
    assert col.tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
    assert col_rev.tolist() == col.flip(0).tolist()


def test_pad_layout():
    model = dim.DiM_T_2(input_size=8, in_channels=1, num_classes=0)
    grid = torch.zeros(1, 4 * 4, 64)
    padded = model.pad_grid(grid, 4, 4).view(7, 7, 64)
    for k in range(3):
        # pad column k of every row
        assert torch.equal(padded[:4, 4 + k], model.pad_tokens[k].expand(4, 64))
        # pad row k, corners included
        assert torch.equal(padded[4 + k, :], model.pad_tokens[k].expand(7, 64))
    assert torch.equal(padded[:4, :4], torch.zeros(4, 4, 64))


def pads_in_grid(model, h, w):
    """(h+3, w+3) ids of the pad token pad_grid puts in each cell, -1 on image cells: each pad token
    is made a one-hot vector, so the id can be read back from the padded grid."""
    with torch.no_grad():
        model.pad_tokens.copy_(torch.eye(3, model.hidden_size))
        padded = model.pad_grid(torch.full((1, h * w, model.hidden_size), -1.0), h, w)
    padded = padded.view(h + 3, w + 3, -1)
    return torch.where(padded[..., 0] < 0, -1, padded[..., :3].argmax(-1))


def spec_cycled_ids(h, w):
    """DiM's 'rho_pad' as the spec words it: pads 0, 1, 2 cycled in row-major order over the pad
    cells (every cell in the 3 columns right of the grid or the 3 rows under it)."""
    ids, k = [], 0
    for i in range(h + 3):
        row = []
        for j in range(w + 3):
            if i < h and j < w:
                row.append(-1)
            else:
                row.append(k % 3)
                k += 1
        ids.append(row)
    return torch.tensor(ids)


@pytest.mark.parametrize("size", [(4, 4), (16, 16), (3, 7)])
def test_cycled_pad_layout_is_the_official_rho_pad(size):
    h, w = size
    lateral = dim.DiM_T_2(input_size=8, in_channels=1, num_classes=0)
    cycled = dim.DiM_T_2(input_size=8, in_channels=1, num_classes=0, pad_layout="cycled")
    ids = pads_in_grid(cycled, h, w)
    assert torch.equal(ids, spec_cycled_ids(h, w))
    assert torch.equal(ids, dim.pad_layout_ids(h, w, 3, "cycled"))
    # the default is unchanged: column k and row k hold pad k, corners by row
    lateral_ids = pads_in_grid(lateral, h, w)
    assert torch.equal(lateral_ids, dim.pad_layout_ids(h, w, 3, "lateral"))
    assert (lateral_ids[:h, w:] == torch.arange(3)).all()
    assert (lateral_ids[h:] == torch.arange(3)[:, None]).all()
    # same cells; only the rows under the grid differ
    assert torch.equal(ids < 0, lateral_ids < 0)
    assert torch.equal(ids[:h], lateral_ids[:h])
    if size == (16, 16):
        # the spec's count: 36 of the 105 pad cells differ at a 16 x 16 grid
        assert (ids >= 0).sum() == 105 and (ids != lateral_ids).sum() == 36


def test_pad_layout_changes_only_what_it_should(relative_error, one_thread):
    torch.manual_seed(0)
    lateral = dim.DiM_T_2(input_size=8, in_channels=1, num_classes=10).eval()
    cycled = dim.DiM_T_2(input_size=8, in_channels=1, num_classes=10, pad_layout="cycled").eval()
    cycled.load_state_dict(lateral.state_dict())  # the layout adds no parameter
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 900]), torch.tensor([2, 10])
    with torch.no_grad():
        assert relative_error(cycled(x, t, y), lateral(x, t, y)) > 1e-4
        # with one pad token everywhere the two layouts are the same sequence
        lateral.pad_tokens.copy_(lateral.pad_tokens[:1].expand(3, -1))
        cycled.pad_tokens.copy_(lateral.pad_tokens)
        assert torch.equal(cycled(x, t, y), lateral(x, t, y))
    with pytest.raises(ValueError, match="'rho_pad' is 'cycled'"):
        dim.DiM_T_2(pad_layout="rho_pad")


def test_cycled_layout_runs_at_several_grid_sizes(one_thread):
    torch.manual_seed(0)
    model = dim.DiM_T_2(input_size=16, in_channels=3, num_classes=10, pad_layout="cycled")
    for size in [(12, 20), (32, 32), (8, 8)]:
        x = torch.randn(2, 3, *size)
        out = model(x, torch.tensor([1, 500]), torch.tensor([3, 10]))
        assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()  # the smallest grid: backward on CPU is the slow part
    assert model.pad_tokens.grad.abs().min(1).values.gt(0).all()  # every pad token is used


@pytest.mark.parametrize("size", [(8, 8), (16, 16), (12, 20), (32, 32)])
def test_any_grid_size(size):
    torch.manual_seed(0)
    model = dim.DiM_T_2(input_size=16, in_channels=3, num_classes=10).eval()
    x = torch.randn(2, 3, *size)
    out = model(x, torch.tensor([1, 500]), torch.tensor([3, 10]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_every_scan_order_is_used_and_matters(relative_error):
    # Replacing the per-layer orders by row-major everywhere must change the output.
    torch.manual_seed(0)
    model = dim.DiM_T_2(input_size=8, in_channels=1, num_classes=10).eval()
    x, t, y = torch.randn(1, 1, 8, 8), torch.tensor([10]), torch.tensor([2])
    with torch.no_grad():
        ref = model(x, t, y)
        model.orders = [0] * model.depth
        assert relative_error(model(x, t, y), ref) > 1e-4


def test_conditioning_changes_output_and_null_label(relative_error):
    torch.manual_seed(0)
    model = dim.DiM_T_2(input_size=8, in_channels=1, num_classes=10).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 10])
    with torch.no_grad():
        a = model(x, t, torch.tensor([1, 1]))
        b = model(x, t, torch.tensor([2, 2]))
        null = model(x, t, None)
        assert relative_error(a, b) > 1e-4
        assert torch.allclose(null, model(x, t, torch.tensor([10, 10])))


def test_bad_input_shape():
    model = dim.DiM_T_2(input_size=8, in_channels=1, num_classes=10)
    with pytest.raises(ValueError, match="multiples of 2"):
        model(torch.randn(1, 1, 9, 8), torch.tensor([1]), None)
    with pytest.raises(ValueError, match="depth must be odd"):
        dim.DiM(depth=4, hidden_size=64)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def test_param_counts_of_named_configs():
    # Built on the meta device: no memory is allocated for the 862M-parameter model.
    with torch.device("meta"):
        counts = {name: count_params(fn(input_size=32, in_channels=4, num_classes=1000))
                  for name, fn in dim.DiM_models.items() if name != "DiM-T/2"}
    # The official DiM-H/2 has 862.4M parameters at 256 px (its README); ours fuses each large-model
    # skip with one (D, 2D) linear instead of two (D, D) linears, one bias of D fewer per skip: 24 *
    # 1536 = 36,864 parameters.
    assert abs(counts["DiM-H/2"] + 24 * 1536 - 862.4e6) < 0.05e6, counts
    assert abs(counts["DiM-L/2"] - 386e6) < 2e6, counts
