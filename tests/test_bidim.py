"""BiDiM tests: the bidirectional mixer against a forward + flipped-backward oracle, separate branch
parameters, image and video shapes, frame-major token order, parameter and GFLOP counts of the named
configs, bad input, Moving Fashion-MNIST and video folders, GIF writing, and a tiny video model
learning on the CPU."""
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import bidim
import data as video_data
from data import DataError
from diffusion import GaussianDiffusion
from ssm import Mamba
from tools import bench


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def open_gates(model, std=0.1):
    """Give the zero-initialised adaLN and output layers random weights, so every block
    contributes."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, std)
    return model


def tiny(num_frames=None, **kwargs):
    torch.manual_seed(0)
    kwargs = {"input_size": 8, "in_channels": 4, "num_classes": 10, **kwargs}
    return open_gates(bidim.BiDiM(depth=2, hidden_size=32, patch_size=2, d_state=4,
                                  num_frames=num_frames, **kwargs))


def fashion_mnist_or_skip():
    if not os.path.isfile(os.path.join(video_data.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")):
        pytest.skip("Fashion-MNIST not installed")


# ------------------------------------------------------------------------------------------------------
# The bidirectional mixer
# ------------------------------------------------------------------------------------------------------

def backward_name(key):
    """The BiMamba parameter that plays the role of Mamba parameter `key` in the backward branch
    (Vim's names)."""
    if key in ("in_proj.weight", "out_proj.weight"):   # shared by both directions
        return key
    return {"A_log": "A_b_log", "D": "D_b"}.get(key, key.replace(".", "_b.", 1))


def test_bimamba_is_forward_plus_flipped_backward_mamba():
    # Oracle: two plain ssm.Mamba mixers sharing in_proj/out_proj, one holding the forward branch,
    # one the backward branch. out_proj has no bias, so out_proj(y_f + y_b) = out_proj(y_f) +
    # out_proj(y_b) and BiMamba(x) = Mamba_f(x) + flip(Mamba_b(flip(x))). Dropping either flip (of x
    # or z, or of the output) fails.
    torch.manual_seed(0)
    mixer = bidim.BiMamba(16, d_state=4).double()
    fwd, bwd = Mamba(16, d_state=4).double(), Mamba(16, d_state=4).double()
    sd = mixer.state_dict()
    fwd.load_state_dict({k: sd[k] for k in fwd.state_dict()})
    bwd.load_state_dict({k: sd[backward_name(k)] for k in bwd.state_dict()})
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    expected = fwd(x) + bwd(x.flip(1)).flip(1)
    torch.testing.assert_close(mixer(x), expected, rtol=1e-10, atol=1e-10)
    assert (fwd(x) - mixer(x)).abs().max() > 1e-3   # the backward branch contributes


def test_bimamba_sees_both_directions():
    # A plain Mamba is causal: the first output ignores the last token. BiMamba's first output
    # depends on it (through the backward branch only), and its last output on the first token.
    # Float64: the forward branch's first output is then bit-identical, and the backward branch's
    # small contribution (1e-5 here: after 11 steps little of the dt-scaled input survives at init)
    # is far above rounding.
    torch.manual_seed(0)
    mixer, causal = bidim.BiMamba(16, d_state=4).double(), Mamba(16, d_state=4).double()
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    bumped_last, bumped_first = x.clone(), x.clone()
    bumped_last[:, -1] += 1
    bumped_first[:, 0] += 1
    with torch.no_grad():
        assert torch.equal(causal(x)[:, 0], causal(bumped_last)[:, 0])
        assert (mixer(x)[:, 0] - mixer(bumped_last)[:, 0]).abs().max() > 1e-7
        assert (mixer(x)[:, -1] - mixer(bumped_first)[:, -1]).abs().max() > 1e-7


def test_branches_have_separate_parameters_and_mamba_init():
    torch.manual_seed(0)
    mixer = bidim.BiMamba(32, d_state=8)
    own = ["conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
           "A_log", "D"]
    sd = mixer.state_dict()
    assert set(sd) == {"in_proj.weight", "out_proj.weight", *own, *map(backward_name, own)}
    assert {backward_name(k) for k in own} == {"conv1d_b.weight", "conv1d_b.bias",
                                               "x_proj_b.weight",
                                               "dt_proj_b.weight", "dt_proj_b.bias", "A_b_log",
                                               "D_b"}
    for k in own:   # separate tensors of the same shape
        assert sd[k].data_ptr() != sd[backward_name(k)].data_ptr() and sd[k].shape == sd[backward_name(k)].shape
    assert not torch.equal(sd["x_proj.weight"], sd["x_proj_b.weight"])   # independently drawn
    # the backward branch is initialised as Mamba's: S4D-real A, D = 1, softplus(dt bias) in
    # [dt_min, dt_max]
    torch.testing.assert_close(mixer.A_b_log, torch.log(torch.arange(1, 9.0)).repeat(64, 1))
    assert torch.equal(mixer.D_b, torch.ones(64)) and mixer.A_b_log._no_weight_decay and mixer.D_b._no_weight_decay
    dt = torch.nn.functional.softplus(mixer.dt_proj_b.bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6 and mixer.dt_proj_b.bias._no_reinit


def test_model_init_keeps_mamba_init_inside_mixers():
    # DiT's xavier / zero-bias loop must skip the mixers: dt_proj biases keep their inverse-softplus
    # values.
    model = bidim.BiDiM_T_2(input_size=8, in_channels=4, num_classes=10)
    for block in model.blocks:
        for dt_proj in (block.mixer.dt_proj, block.mixer.dt_proj_b):
            dt = torch.nn.functional.softplus(dt_proj.bias)
            assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6 and dt.std() > 0
        assert not block.adaLN_modulation[-1].weight.any()   # adaLN-Zero
    assert not model.final_layer.linear.weight.any()
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([0, 999]))
    assert not out.any()   # zero-initialised output layer


# ------------------------------------------------------------------------------------------------------
# Shapes, token order, input checks
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("H, W", [(8, 8), (16, 16), (6, 10)])
def test_image_shapes(H, W):
    model = tiny()
    x, t = torch.randn(3, 4, H, W), torch.tensor([0, 500, 999])
    with torch.no_grad():
        for y in (torch.tensor([0, 3, 10]), None):   # 10 = num_classes is the null class
            out = model(x, t, y)
            assert out.shape == (3, 8, H, W) and torch.isfinite(out).all()
        assert torch.equal(model(x, t, None), model(x, t, torch.full((3,), 10)))


@pytest.mark.parametrize("T, H, W", [(4, 8, 8), (1, 8, 8), (3, 6, 10), (7, 4, 4)])
def test_video_shapes_any_frame_count(T, H, W):
    model = tiny(num_frames=4, in_channels=1)
    with torch.no_grad():
        out = model(torch.randn(2, 1, T, H, W), torch.tensor([3, 800]), torch.tensor([1, 2]))
    assert out.shape == (2, 2, T, H, W) and torch.isfinite(out).all()


def test_video_tokens_are_frame_major_with_temporal_embedding():
    model = tiny(num_frames=3, in_channels=1)
    clip = torch.randn(2, 1, 3, 8, 6)
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    with torch.no_grad():
        model(clip, torch.tensor([1, 2]))
        # (h*w, D)
        space = bidim.get_2d_sincos_pos_embed(32, 4, 3)
        # (T, D)
        time = bidim.get_1d_sincos_pos_embed(32, torch.arange(3)).float()
        expected = torch.cat([model.x_embedder(clip[:, :, f]) + space + time[f] for f in range(3)],
                             dim=1)
    # all tokens of frame 0 (row-major), then frame 1, ...
    torch.testing.assert_close(seen["x"], expected)
    # the image model's embedding is DiT's, with no temporal part
    torch.testing.assert_close(tiny().pos_embed(1, 4, 3, "cpu")[0], space)


def test_every_frame_sees_the_whole_clip():
    # One sequence over space and time, scanned both ways: the first frame's output depends on the
    # last frame (backward scan) and the last frame's on the first (forward scan). At init the
    # backward effect over 3 frames of 16 tokens is small (~1e-6: little of a dt-scaled input
    # survives 48 steps), so the test runs in float64, where a causal model's first frame would be
    # bit-identical (DiT's time embedder computes its sinusoid in float32, so it stays float32; the
    # condition is promoted to float64 when the label embedding is added).
    model = tiny(num_frames=4, in_channels=1).double()
    model.t_embedder.float()
    clip, t = torch.randn(1, 1, 4, 8, 8, dtype=torch.float64), torch.tensor([100])
    late, early = clip.clone(), clip.clone()
    late[:, :, -1] += 1
    early[:, :, 0] += 1
    with torch.no_grad():
        out = model(clip, t)
        assert (model(late, t) - out)[:, :, 0].abs().max() > 1e-9
        assert (model(early, t) - out)[:, :, -1].abs().max() > 1e-9


def test_bad_inputs_raise_clear_errors():
    image, video = tiny(), tiny(num_frames=4)
    t = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="video model .* expects clips"):
        video(torch.randn(2, 4, 8, 8), t)
    with pytest.raises(ValueError, match="image model .* num_frames=T"):
        image(torch.randn(2, 4, 3, 8, 8), t)
    with pytest.raises(ValueError, match="4 channels"):
        image(torch.randn(2, 3, 8, 8), t)
    with pytest.raises(ValueError, match="multiples of the patch size 2"):
        image(torch.randn(2, 4, 8, 7), t)
    with pytest.raises(ValueError, match="multiples of the patch size 2"):
        video(torch.randn(2, 4, 0, 8, 8), t)
    with pytest.raises(ValueError, match="num_frames"):
        bidim.BiDiM_T_2(num_frames=0)


def test_contract_attributes():
    model = bidim.BiDiM_T_2(input_size=16, in_channels=3, num_classes=7, num_frames=8)
    assert (model.in_channels, model.out_channels, model.patch_size, model.num_classes,
            model.input_size, model.num_frames) == (3, 6, 2, 7, 16, 8)
    assert bidim.BiDiM_T_2().num_frames is None
    assert (bidim.BiDiM.objective, bidim.BiDiM.schedule,
            bidim.BiDiM.time_offset) == ("eps", "linear", 0)
    assert bidim.BiDiM.train_defaults == dict(lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999),
                                              eps=1e-8, warmup=0,
                                              grad_clip=0.0, label_dropout=0.1, ema=0.9999)


# ------------------------------------------------------------------------------------------------------
# Configs: parameters and cost
# ------------------------------------------------------------------------------------------------------

# SD-VAE latents (4 channels), 1000 classes, 32 x 32 grid (256 px); measured on the meta device.
PARAMS = {"BiDiM-XL/2": 774_699_296, "BiDiM-XL/4": 774_865_280, "BiDiM-XL/8": 775_529_216,
          "BiDiM-L/2": 526_063_648, "BiDiM-L/4": 526_211_200, "BiDiM-B/2": 150_001_184,
          "BiDiM-B/4": 150_111_872,
          "BiDiM-S/2": 38_284_064, "BiDiM-S/4": 38_339_456, "BiDiM-T/2": 491_168}


def test_param_counts_of_named_configs():
    assert set(bidim.BiDiM_models) == set(PARAMS)
    for name, factory in bidim.BiDiM_models.items():
        with torch.device("meta"):
            model = factory(input_size=32, in_channels=4, num_classes=1000)
        assert sum(p.numel() for p in model.parameters()) == PARAMS[name], name


def test_gflops_and_bench_agree():
    with torch.device("meta"):
        s2 = bidim.BiDiM_S_2(input_size=32, in_channels=4, num_classes=1000)
        video = bidim.BiDiM_S_2(input_size=32, in_channels=4, num_classes=0, num_frames=16)
    total, scan = bidim.flops(s2)
    assert total == pytest.approx(7.44, abs=0.01) and scan == pytest.approx(0.689, abs=0.001)
    assert total == pytest.approx(bench.count_gmacs(s2, 32)[0], rel=1e-9)
    # a 16-frame clip of 32 x 32 latents is 4,096 tokens, the same work as one 128 x 128 latent
    # image
    assert bidim.flops(video)[0] == pytest.approx(bidim.flops(s2, input_size=128)[0], rel=1e-9)
    assert bidim.flops(video)[0] == pytest.approx(118.92, abs=0.01)


# ------------------------------------------------------------------------------------------------------
# Moving Fashion-MNIST
# ------------------------------------------------------------------------------------------------------

def test_moving_fashion_mnist_is_deterministic():
    fashion_mnist_or_skip()
    a = video_data.MovingFashionMNIST(num_frames=6, size=32, num_clips=20, seed=0)
    b = video_data.MovingFashionMNIST(num_frames=6, size=32, num_clips=20, seed=0)
    c = video_data.MovingFashionMNIST(num_frames=6, size=32, num_clips=20, seed=1)
    x, y = a[5]
    assert x.shape == (1, 6, 32, 32) and x.dtype == torch.float32 and isinstance(y, int) and 0 <= y < 10
    # same item, same clip
    assert torch.equal(x, a[5][0]) and torch.equal(x, b[5][0]) and y == b[5][1]
    # other seed / index differ
    assert not torch.equal(x, c[5][0]) and not torch.equal(x, a[6][0])
    # label of the first object
    assert y == int(a.labels[a.trajectory(5)[0][0]])
    assert len(a) == 20 and a.object_size == 14
    with pytest.raises(IndexError):
        a.trajectory(20)


def test_moving_fashion_mnist_values_motion_and_bounces():
    fashion_mnist_or_skip()
    ds = video_data.MovingFashionMNIST(num_frames=16, size=64, digits=1, num_clips=30, seed=3)
    room = 64 - 28
    bounced = 0
    for i in range(len(ds)):
        x, _ = ds[i]
        assert x.min() >= -1 and x.max() <= 1 and x.max() > 0
        objects, corners = ds.trajectory(i)
        # always entirely inside the frame
        assert corners.min() >= 0 and corners.max() <= room
        steps = np.diff(corners[:, 0], axis=0)
        assert np.abs(steps).max() <= 6                                     # a few pixels per frame
        bounced += bool((np.diff(np.sign(steps), axis=0) != 0).any())
        # nothing is cut off: every frame holds the whole object (one object at its native 28 x 28
        # size)
        pixels = (x[0] + 1) * 127.5
        torch.testing.assert_close(pixels.round().sum((1, 2)),
                                   torch.full((16,), float(ds.images[objects[0]].astype(np.int64).sum())))
    assert bounced >= 5   # most 16-frame clips hit a wall at 2-5 px/frame in 36 px of room
    # two objects are combined with max (Moving MNIST): the frame is at least as bright as each
    # object
    two = video_data.MovingFashionMNIST(num_frames=4, size=64, digits=2, num_clips=3, seed=0)
    clip = ((two[1][0][0] + 1) * 127.5).round()
    objects, corners = two.trajectory(1)
    for k, obj in enumerate(objects):
        r, c = corners[0, k]
        assert (clip[0, r:r + 28,
                     c:c + 28] >= torch.from_numpy(two.images[obj].astype(np.float32))).all()


# ------------------------------------------------------------------------------------------------------
# Video folders and writers
# ------------------------------------------------------------------------------------------------------

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
           (255, 255, 255), (0, 0, 0), (128, 0, 0), (0, 128, 0)]


def solid(colour, size=(20, 12)):
    return Image.new("RGB", size, colour)


def test_video_folder_frames_and_gif(tmp_path):
    frames = tmp_path / "videos" / "walk"
    frames.mkdir(parents=True)
    # 10 frames; names sort in frame order
    for k, colour in enumerate(COLOURS):
        solid(colour).save(frames / f"{k:03d}.png")
    short = tmp_path / "videos" / "short"
    short.mkdir()
    for k in range(2):
        solid(COLOURS[k]).save(short / f"{k}.png")
    gif = [solid(c) for c in COLOURS[:9]]
    gif[0].save(tmp_path / "videos" / "clip.gif", save_all=True, append_images=gif[1:],
                duration=100, loop=0)

    ds = video_data.VideoFolder(str(tmp_path / "videos"), num_frames=4, size=8)
    # 10 // 4 + 9 // 4 clips; "short" skipped
    assert len(ds) == 4 and ds.skipped == 1 and ds.num_classes == 0
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 4, 8, 8) and y == 0 and x.min() >= -1 and x.max() <= 1
    # clips are consecutive frames in order: the second clip of each video holds frames 4..7
    expected = torch.tensor(COLOURS[4:8], dtype=torch.float32) / 127.5 - 1      # (T, 3)
    # the GIF's palette may move a colour slightly
    for name, atol in (("clip.gif", 0.02), ("walk", 0.0)):
        i = next(i for i, (v, start) in enumerate(ds.clips) if ds.videos[v][0].endswith(name)
                 and start == 4)
        torch.testing.assert_close(ds[i][0][:, :, 4, 4].t(), expected, atol=atol, rtol=0)
    assert len(video_data.VideoFolder(str(tmp_path / "videos"), num_frames=4, size=8,
                                      stride=1)) == 7 + 6


def test_video_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no videos"):
        video_data.VideoFolder(str(tmp_path / "empty"), 4, 8)
    with pytest.raises(DataError, match="no such folder"):
        video_data.VideoFolder(str(tmp_path / "missing"), 4, 8)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.gif").write_bytes(b"not a gif at all")
    with pytest.raises(DataError, match="broken.gif"):
        video_data.VideoFolder(str(bad), 4, 8)
    frames = tmp_path / "frames" / "v"
    frames.mkdir(parents=True)
    for k in range(4):
        solid(COLOURS[k]).save(frames / f"{k}.png")
    (frames / "2.png").write_bytes(b"\x89PNG truncated")
    ds = video_data.VideoFolder(str(tmp_path / "frames"), 4, 8)
    with pytest.raises(DataError, match="2.png"):
        ds[0]
    with pytest.raises(DataError, match="shorter than num_frames=5"):
        video_data.VideoFolder(str(tmp_path / "frames"), 5, 8)


def test_save_gif_and_frame_strip(tmp_path):
    torch.manual_seed(0)
    clip = torch.rand(1, 5, 8, 6) * 2 - 1
    video_data.save_gif(clip, tmp_path / "one.gif", fps=10)
    with Image.open(tmp_path / "one.gif") as img:
        assert img.n_frames == 5 and img.size == (6, 8) and img.info["duration"] == 100
        img.seek(2)
        grey = np.asarray(img.convert("L"), dtype=np.float32)
    np.testing.assert_allclose(grey, ((clip[0, 2] + 1) * 127.5).round().numpy(), atol=1)
    video_data.save_gif(torch.rand(5, 3, 4, 8, 8) * 2 - 1, tmp_path / "grid.gif", pad=2)
    with Image.open(tmp_path / "grid.gif") as img:
        assert img.n_frames == 4 and img.size == (3 * 10 + 2, 2 * 10 + 2)   # 3 per row, 2 rows
    video_data.save_frame_strip(torch.rand(2, 1, 5, 8, 6) * 2 - 1, tmp_path / "strip.png", pad=2)
    with Image.open(tmp_path / "strip.png") as img:
        assert img.size == (5 * 8 + 2, 2 * 10 + 2)   # frames left to right, one clip per row
    with pytest.raises(ValueError, match="clip"):
        video_data.save_gif(torch.zeros(2, 8, 8), tmp_path / "bad.gif")


# ------------------------------------------------------------------------------------------------------
# Diffusion on video: sampling shapes, and a tiny model learning Moving Fashion-MNIST
# ------------------------------------------------------------------------------------------------------

def test_video_sampling_shapes():
    model = tiny(num_frames=3, in_channels=1).eval()
    diffusion = GaussianDiffusion(schedule="linear")
    noise = torch.randn(2, 1, 3, 8, 8)
    for sampler in ("ddpm", "dpm++"):
        x = diffusion.sample(model, noise, torch.tensor([1, 2]), sampler=sampler, steps=2,
                             cfg_scale=2.0,
                             null_label=10, generator=torch.Generator().manual_seed(0))
        assert x.shape == noise.shape and torch.isfinite(x).all()


def test_tiny_video_model_learns_moving_fashion_mnist():
    fashion_mnist_or_skip()
    data = video_data.MovingFashionMNIST(num_frames=4, size=32, num_clips=64, seed=0)
    # (64, 1, 4, 32, 32)
    clips = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([data[i][1] for i in range(len(data))])
    torch.manual_seed(0)
    model = bidim.BiDiM(input_size=32, patch_size=4, in_channels=1, hidden_size=32, depth=2,
                        d_state=4, num_classes=10, num_frames=4)
    diffusion = GaussianDiffusion(schedule=model.schedule, time_offset=model.time_offset)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    # measured: mean loss 0.84 over the first 20 steps, 0.29 over the last 20
    for _ in range(40):
        idx = torch.randint(0, len(clips), (8,), generator=g)
        loss = diffusion.training_loss(model, clips[idx], labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert all(math.isfinite(v) for v in losses)
    assert last < 0.5 * first, (first, last)
