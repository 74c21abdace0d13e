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
