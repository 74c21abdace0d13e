"""DiMSUM tests: the official-output fidelity check, the Haar transform and wavelet token layout,
scan orders, shapes at several grids, bad input, initialisation, and parameter counts of the named
configs."""
import pytest
import torch

import dimsum

# Agreement with the official recording. The recording is float32 (mamba-ssm's sequential reference
# scan) and so is our forward pass (chunked scan). Measured on the fidelity inputs: our float64
# model (reference scan) vs the recording 6.7e-6 (the recording's own float32 error), our float32 vs
# our float64 5.3e-6, our float32 vs the recording 7.8e-6. The noise floor is thus ~7e-6; the
# tolerance is about twice that. A 1% change to any single official tensor moves the output by >=
# 4e-5 (fidelity/README.md), well above it.
TOLERANCE = 1.5e-5


@pytest.fixture
def small_official(fidelity):
    """The fidelity vector's tensors, its official state dict and a DiMSUM built with its config."""
    tensors, meta = fidelity("dimsum_small")
    cfg = meta["config"]
    assert cfg["block_type"] == "combined" and cfg["use_attn_every_k_layers"] == 4 and cfg["rms_norm"]
    assert cfg["learnable_pe"] and not cfg["learn_sigma"] and not cfg["use_final_norm"]
    model = dimsum.DiMSUM(input_size=cfg["img_resolution"], patch_size=cfg["patch_size"],
                          in_channels=cfg["in_channels"], hidden_size=cfg["hidden_size"],
                          depth=cfg["depth"],
                          num_classes=cfg["num_classes"], drop_path=cfg["drop_path"])
    official = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    return tensors, official, model


def run(model, tensors, dtype=torch.float32):
    with torch.no_grad():
        return model(tensors["input.x"].to(dtype), tensors["input.t"].to(dtype), tensors["input.y"])


# ------------------------------------------------------------------------------------------------------
# Fidelity: the official DiM (block type "combined") output on known weights
# ------------------------------------------------------------------------------------------------------

def test_dimsum_matches_official_output(relative_error, small_official):
    tensors, official, model = small_official
    loaded, missing, unused = dimsum.load_official_state_dict(model, official)
    assert missing == [] and unused == [], (missing, unused)
    model.eval()
    err = relative_error(run(model, tensors), tensors["output"])
    assert err < TOLERANCE, f"relative error {err:.2e} against the official output"
    # The check can fail: a 1% change to one scan's A matrix in the wavelet branch of block 5
    # (8e-5).
    with torch.no_grad():
        model.blocks[5].freq_mamba.mixer.A_log.mul_(1.01)
    assert relative_error(run(model, tensors), tensors["output"]) > 2 * TOLERANCE


def test_wavelet_window_order_matters_for_fidelity(relative_error, small_official):
    # Row-first and column-first window scans swapped (even <-> odd layers): far from the recording
    # (0.6).
    tensors, official, model = small_official
    dimsum.load_official_state_dict(model, official)
    model.eval()
    spatial, windows = model.orders(8, 8, torch.device("cpu"))
    model._order_cache[(8, 8, "cpu")] = (spatial, windows[::-1])
    assert relative_error(run(model, tensors), tensors["output"]) > 0.1


def test_float64_noise_floor(relative_error, small_official):
    # The same weights in float64 with the pure-PyTorch chunked scan (not the C kernel of the float32
    # run; the sequential loop gives the same numbers 6x slower): agrees with the recording and with
    # float32 to the noise floor quoted above.
    tensors, official, model = small_official
    dimsum.load_official_state_dict(model, official)
    model.eval()
    out32 = run(model, tensors)
    model.double()
    for module in model.modules():
        if hasattr(module, "backend"):
            module.backend = "torch"
    out64 = run(model, tensors, torch.float64)
    assert out64.dtype == torch.float64
    assert relative_error(out64, tensors["output"].double()) < TOLERANCE
    assert relative_error(out32.double(), out64) < 1e-5


def test_loader_drops_only_the_dead_projection_and_haar_buffers(small_official):
    tensors, official, model = small_official
    loaded, missing, unused = dimsum.load_official_state_dict(model, official)
    dropped = sorted(set(official) - set(k.replace(".fusion.", ".proj.") for k in loaded))
    assert all(".cond_proj." in k or ".dwt." in k or ".idwt." in k for k in dropped), dropped
    depth = model.depth
    # weight and bias, two branches per block
    assert sum(".cond_proj." in k for k in dropped) == 2 * 2 * depth
    # The official parameter count is ours plus the dead projections (the Haar filters are buffers).
    ours = sum(p.numel() for p in model.parameters())
    official_params = sum(v.numel() for k,
                          v in official.items() if ".dwt." not in k and ".idwt." not in k)
    cond = sum(v.numel() for k, v in official.items() if ".cond_proj." in k)
    assert official_params == ours + cond
    # A training checkpoint dict loads its EMA weights; a tensor of the wrong shape is refused.
    assert dimsum.load_official_state_dict(model, {"ema": official, "model": {}})[1] == []
    bad = dict(official, **{"blocks.0.mlp.w3.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="another config"):
        dimsum.load_official_state_dict(model, bad)


# ------------------------------------------------------------------------------------------------------
# Haar transform and the wavelet token layout
# ------------------------------------------------------------------------------------------------------

def test_haar_known_answer():
    x = torch.randn(2, 3, 6, 8)
    a, b, c, d = x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    bands = dimsum.haar_dwt(x).view(2, 4, 3, 3, 4)   # band-major: [LL, LH, HL, HH] x C
    expected = [(a + b + c + d) / 2, (a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2]
    for k in range(4):
        torch.testing.assert_close(bands[:, k], expected[k])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-14)])
def test_haar_is_orthonormal_and_invertible(dtype, tol, relative_error):
    x = torch.randn(2, 5, 16, 12, dtype=dtype)
    one = dimsum.haar_dwt(x)
    two = dimsum.haar_dwt(one)                                       # 2 levels: (2, 80, 4, 3)
    assert two.shape == (2, 80, 4, 3)
    assert relative_error(dimsum.haar_idwt(dimsum.haar_idwt(two)), x) < tol
    # orthonormal: energy preserved at each level
    for y in (one, two):
        assert abs(y.pow(2).sum().item() / x.pow(2).sum().item() - 1) < tol


@pytest.mark.parametrize("h,w", [(8, 8), (16, 16), (8, 12)])
def test_wavelet_tokens_invertible(h, w, relative_error):
    x = torch.randn(2, h * w, 6, dtype=torch.float64)
    y = dimsum.wavelet_tokens(x, h, w)
    assert y.shape == x.shape
    assert relative_error(dimsum.wavelet_tokens_inverse(y, h, w), x) < 1e-14
    # the 2-level coefficients are divided by 2^2: energy / 16
    assert abs(y.pow(2).sum().item() * 16 / x.pow(2).sum().item() - 1) < 1e-12


@pytest.mark.parametrize("h,w", [(8, 8), (16, 12)])
def test_wavelet_tokens_are_two_haar_levels(h, w):
    # wavelet_tokens works per 4 x 4 block with one 16 x 16 matrix; the reference is the definition:
    # haar_dwt (the official stride-2 convolution) twice on the (N, C, h, w) map, /4, in the layout
    N, C = 2, 6
    x = torch.randn(N, h * w, C, dtype=torch.float64)
    y = dimsum.haar_dwt(dimsum.haar_dwt(x.transpose(1, 2).reshape(N, C, h, w))) / 4
    # (N, level-1 band, level-2 band, C, h/4, w/4) -> 16C read as (c, p1, p2) -> token (i, p1, j, p2)
    y = y.view(N, 4, 4, C, h // 4, w // 4).transpose(1, 2).reshape(N, C, 4, 4, h // 4, w // 4)
    expected = y.permute(0, 4, 2, 5, 3, 1).reshape(N, h * w, C)
    torch.testing.assert_close(dimsum.wavelet_tokens(x, h, w), expected, rtol=0, atol=1e-14)


def test_wavelet_token_layout():
    # A constant map has only the LL-LL subband (subband 0, which is the mean: value v). With C = 16
    # channels, channel c' of subband 0 is channel index j = c', stored in token (4i + p1, 4j + p2)
    # with 4 p1 + p2 = c' % 16 at feature c' // 16 = 0. So feature 0 of every token of every 4 x 4
    # tile carries v, the rest is 0.
    C, h, w = 16, 8, 8
    v = torch.arange(1.0, C + 1)                                      # channel c' has value c' + 1
    x = v.expand(1, h * w, C).clone()
    y = dimsum.wavelet_tokens(x, h, w).view(h // 4, 4, w // 4, 4, C)  # (i, p1, j, p2, feature)
    torch.testing.assert_close(y[..., 0], v.view(4, 4)[None, :, None].expand(2, 4, 2, 4))
    assert y[..., 1:].abs().max() == 0
    # A detail at one pixel of channel 0 reaches all 16 subbands of its coarse location (each +-1/4
    # before the division by 4); channel 0 of subband s is coefficient channel 16 s, i.e. feature s
    # of the tile's first token.
    x = torch.zeros(1, h * w, C)
    # pixel (5, 6): coarse location (1, 1)
    x[0, 5 * w + 6, 0] = 1.0
    y = dimsum.wavelet_tokens(x, h, w).view(h // 4, 4, w // 4, 4, C)
    torch.testing.assert_close(y[1, 0, 1, 0].abs(), torch.full((C,), 1 / 16))
    torch.testing.assert_close(y.abs().sum(), torch.tensor(1.0))


# ------------------------------------------------------------------------------------------------------
# Scan orders
# ------------------------------------------------------------------------------------------------------

def test_spatial_orders():
    row, row_rev, col, col_rev = dimsum.spatial_orders(2, 3)
    assert row.tolist() == [0, 1, 2, 3, 4, 5] and row_rev.tolist() == [5, 4, 3, 2, 1, 0]
    assert col.tolist() == [0, 3, 1, 4, 2, 5] and col_rev.tolist() == [5, 2, 4, 1, 3, 0]


def test_window_orders():
    # 8 x 8 grid: 4 x 4 windows of 2 x 2 tokens (window side = grid side / 4, as official
    # local_scan).
    row_first, column_first = dimsum.window_orders(8, 8)
    # window (0,0) row by row, then (0,1)
    assert row_first[:8].tolist() == [0, 1, 8, 9, 2, 3, 10, 11]
    # window (0,0) column by column, then (1,0)
    assert column_first[:8].tolist() == [0, 8, 1, 9, 16, 24, 17, 25]
    for perm in (row_first, column_first):
        assert sorted(perm.tolist()) == list(range(64))


def test_every_order_is_used_and_matters(relative_error, perturb):
    torch.manual_seed(0)
    model = perturb(dimsum.DiMSUM_T_2(input_size=16, in_channels=4, num_classes=10), 0.1).eval()
    x, t, y = torch.randn(1, 4, 16, 16), torch.tensor([0.3]), torch.tensor([2])
    with torch.no_grad():
        ref = model(x, t, y)
        spatial, windows = model.orders(8, 8, torch.device("cpu"))
        model._order_cache[(8, 8, "cpu")] = ([spatial[0]] * 4, windows)
        assert relative_error(model(x, t, y), ref) > 3e-4
        model._order_cache[(8, 8, "cpu")] = (spatial, [windows[0]] * 2)
        assert relative_error(model(x, t, y), ref) > 3e-4


# ------------------------------------------------------------------------------------------------------
# Network behaviour
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(16, 16), (8, 8), (32, 32), (8, 24), (24, 16)])
def test_forward_shapes(size, perturb):
    torch.manual_seed(0)
    model = perturb(dimsum.DiMSUM_T_2(input_size=16, in_channels=4, num_classes=10), 0.1).eval()
    x = torch.randn(2, 4, *size)
    with torch.no_grad():
        out = model(x, torch.tensor([0.1, 0.9]), torch.tensor([3, 10]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_bad_input_shape():
    model = dimsum.DiMSUM_T_2(input_size=16, in_channels=4, num_classes=10)
    t = torch.tensor([0.5])
    with pytest.raises(ValueError, match="multiples of the patch size 2"):
        model(torch.randn(1, 4, 15, 16), t, None)
    with pytest.raises(ValueError, match="multiples of 4 \\* patch_size = 8"):
        # 6 x 8 tokens: 6 is not a multiple of 4
        model(torch.randn(1, 4, 12, 16), t, None)
    with pytest.raises(ValueError, match="expects \\(N, 4, H, W\\)"):
        model(torch.randn(1, 3, 16, 16), t, None)


def test_conditioning_and_null_label(relative_error, perturb):
    torch.manual_seed(0)
    model = perturb(dimsum.DiMSUM_T_2(input_size=16, in_channels=4, num_classes=10), 0.1).eval()
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([0.5, 0.5])
    with torch.no_grad():
        a = model(x, t, torch.tensor([1, 1]))
        assert relative_error(model(x, t, torch.tensor([2, 2])), a) > 1e-4
        assert relative_error(model(x, torch.tensor([0.6, 0.6]), torch.tensor([1, 1])), a) > 1e-4
        assert torch.equal(model(x, t, None), model(x, t, torch.tensor([10, 10])))
    uncond = dimsum.DiMSUM_T_2(input_size=16, in_channels=4, num_classes=0)
    assert uncond.y_embedder.embedding_table.weight.shape == (1, 64)
    assert uncond(x, t, None).shape == x.shape


def test_shared_block_applied_after_every_fourth(perturb):
    model = perturb(dimsum.DiMSUM_T_2(input_size=16, in_channels=4, num_classes=10), 0.1).eval()
    calls = []
    model.attn_block.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(torch.randn(1, 4, 16, 16), torch.tensor([0.5]), None)
    assert len(calls) == 2 and sum(isinstance(m, dimsum.DiTBlock) for m in model.modules()) == 1


def test_init_and_gradients(perturb):
    torch.manual_seed(0)
    model = dimsum.DiMSUM_T_2(input_size=16, in_channels=4, num_classes=10)
    x, t, y = torch.randn(2, 4, 16, 16), torch.rand(2), torch.tensor([1, 10])
    assert model(x, t, y).abs().max() == 0                           # zero-initialised output layer
    pos = dimsum.get_2d_sincos_pos_embed(64, 8)
    torch.testing.assert_close(model.pos_embed.data, pos)
    assert model.pos_embed.requires_grad
    sin1 = torch.sin(1.0 / 10000 ** (torch.arange(16) / 16.0))
    # token (0, 1): the first half encodes the column
    torch.testing.assert_close(pos[0, 1, :16], sin1)
    # token (1, 0): the second half encodes the row
    torch.testing.assert_close(pos[0, 8, 32:48], sin1)
    # every parameter takes part in the output (training mode: drop-path active)
    model = perturb(model, 0.1).train()
    model(x, t, y).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def test_param_counts_of_named_configs():
    # The paper sizes (T/2 and S/2 are ours), built on the meta device. The official counts add the
    # dead cond_proj, a Linear(D, D) with bias in each of the 2 branches of every block: depth * 2 *
    # (D * D + D).
    with torch.device("meta"):
        models = {name: fn(input_size=32, in_channels=4, num_classes=1000)
                  for name, fn in dimsum.DiMSUM_models.items()
                  if name not in ("DiMSUM-T/2", "DiMSUM-S/2")}
    ours = {name: count_params(m) for name, m in models.items()}
    official = {name: n + m.depth * 2 * (m.hidden_size ** 2 + m.hidden_size) for (name, n), m in
                zip(ours.items(), models.values())}
    assert ours == {"DiMSUM-B/2": 184_373_008, "DiMSUM-L/2": 426_329_104,
                    "DiMSUM-XL/2": 791_074_960}
    assert abs(official["DiMSUM-L/2"] - 460e6) < 0.5e6          # the README's "460M" (459.92M)
    assert abs(official["DiMSUM-B/2"]
               - 198.5e6) < 0.1e6 and abs(official["DiMSUM-XL/2"] - 854.8e6) < 0.1e6
    with torch.device("meta"):
        at512 = dimsum.DiMSUM_L_2(input_size=64, num_classes=1000)
    # "461M" at 512 px
    assert abs(count_params(at512) + 16 * 2 * (1024 ** 2 + 1024) - 461e6) < 0.5e6


def test_per_block_compilation_traces_few_graphs(graph_counter):
    # each block has its own stochastic-depth rate; as a tensor it does not make torch.compile trace
    # every block anew (as Python floats it did: one graph per block, ~190 s of compiling for L/2)
    import models
    counting_backend, graphs = graph_counter
    torch.manual_seed(0)
    model = dimsum.DiMSUM_T_2(input_size=8, in_channels=1, num_classes=10)
    compiled = models.compile_blocks(model, backend=counting_backend)
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 10])
    with torch.no_grad():
        out = model(x, t, y)
    assert torch.isfinite(out).all()
    # the first block (no residual stream yet), the others, the shared attention block; the stem and
    # the head (models.BETWEEN_BLOCKS)
    assert compiled == 9 and len(graphs) <= 5, len(graphs)


def test_gated_mlp_makes_its_product_again_in_the_backward():
    # the GEGLU product (w3's input) is recomputed from a and b instead of kept: one (tokens, hidden)
    # tensor less alive after the forward, and the same output and gradients as the plain formula
    import copy

    import torch.nn.functional as F
    from tools.memory import LiveStorages

    def plain(mlp, x):
        a, b = mlp.w12(x).chunk(2, dim=-1)
        return mlp.w3(F.gelu(a, approximate="tanh") * b)

    torch.manual_seed(0)
    mlp = dimsum.GatedMLP(8, 32).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    runs = []
    for fn in (lambda m, x: m(x), plain):
        m = copy.deepcopy(mlp)
        with LiveStorages() as live:
            y = fn(m, x)
            kept = live.nbytes()
        runs.append((kept, y, torch.autograd.grad(y.sum(), [x, *m.parameters()])))
    (kept, y, grads), (kept_plain, y_plain, grads_plain) = runs
    assert kept_plain - kept == 2 * 5 * 32 * 8  # GELU's output (eager; compiled, the product)
    assert torch.equal(y, y_plain) and all(torch.equal(g, h) for g, h in zip(grads, grads_plain))
