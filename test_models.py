"""The contract every config in the registry (models.py) meets, so that train.py and sample.py never
special-case a model: it builds from (input_size, in_channels, num_classes); model(x, t, y) takes
any grid its patch size divides, with labels or with y=None (the null class), and returns the shape
its objective needs; its parameter count is its config's; and for the tiny configs, which run for
real: a seed fixes the initial weights, a checkpoint round trip reproduces the outputs, and the
training loss falls. Large configs run on the meta device (shapes only, no memory); their scans are
counted, not run."""
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import ssm
from diffusion import create_diffusion
from models import MODELS, GraphedModel, checkpoint_blocks, load_model, takes_clips

# Parameters at input_size 32, 4 channels, 1000 classes. A change here is a change of architecture:
# the model files' own tests check the papers' counts.
PARAMS = {
    "DiM-H/2": 862_370_320, "DiM-L/2": 386_038_800, "DiM-S/2": 51_586_576, "DiM-T/2": 370_256,
    "BiDiM-XL/2": 774_699_296, "BiDiM-XL/4": 774_865_280, "BiDiM-XL/8": 775_529_216,
    "BiDiM-L/2": 526_063_648,
    "BiDiM-L/4": 526_211_200, "BiDiM-B/2": 150_001_184, "BiDiM-B/4": 150_111_872,
    "BiDiM-S/2": 38_284_064, "BiDiM-S/4": 38_339_456, "BiDiM-T/2": 491_168,
    "DiMSUM-B/2": 184_373_008, "DiMSUM-L/2": 426_329_104, "DiMSUM-XL/2": 791_074_960,
    "DiMSUM-S/2": 46_696_336, "DiMSUM-T/2": 1_044_048,
    "LaMamba-XL": 659_742_248, "LaMamba-L": 424_017_000, "LaMamba-B": 136_333_736,
    "LaMamba-S": 35_329_112, "LaMamba-T": 2_189_520,
    "DiT-XL/2": 674_834_720, "DiT-XL/4": 675_000_704, "DiT-XL/8": 675_664_640,
    "DiT-L/2": 457_840_672,
    "DiT-L/4": 457_988_224, "DiT-B/2": 130_315_808, "DiT-B/4": 130_426_496, "DiT-S/2": 32_865_056,
    "DiT-S/4": 32_920_448, "DiT-T/2": 394_912,
}
TINY = [name for name in MODELS if name.split("-")[1].startswith("T")]


def test_every_config_is_listed():
    assert set(PARAMS) == set(MODELS) and TINY


def out_channels(model, C):
    """What the objective needs: eps models predict eps (C) or eps and the variance interpolation
    (2C), flow models the velocity (C)."""
    diffusion = create_diffusion(model)
    assert diffusion.objective in ("eps", "flow")
    assert model.out_channels in ((C, 2 * C) if diffusion.objective == "eps" else (C,))
    return model.out_channels


@pytest.mark.parametrize("name", list(MODELS))
def test_contract_on_meta(name):
    with torch.device("meta"):
        model = MODELS[name](input_size=32, in_channels=4, num_classes=1000).eval()
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    assert (model.input_size, model.in_channels, model.num_classes) == (32, 4, 1000)
    C_out = out_channels(model, 4)
    # a larger, oblong grid than the one built for (LaMamba: multiples of 8); the trained grid and
    # the null class are the tiny configs' tests (the same code at every size)
    x = torch.empty(2, 4, 64, 48, device="meta")
    label = torch.zeros(2, dtype=torch.long, device="meta")
    t = torch.empty(2, device="meta") if model.objective == "flow" else label
    with torch.no_grad(), ssm.count_scan_flops():
        assert model(x, t, label).shape == (2, C_out, 64, 48)


def build(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs = {"input_size": 8, "in_channels": 3, "num_classes": 10, **kwargs}
    return MODELS[name](**kwargs)


def inputs(model, n=2, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, model.in_channels, size, size, generator=g)
    t = torch.rand(n, generator=g) if model.objective == "flow" else torch.randint(0, 1000, (n,), generator=g)
    return x, t, torch.randint(0, model.num_classes, (n,), generator=g)


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_labels_and_null_class(name, one_thread, perturb):
    model = perturb(build(name), 0.02, seed=2).eval()
    C_out = out_channels(model, 3)
    with torch.no_grad():
        for size in (8, 16):
            x, t, y = inputs(model, size=size)
            out, null = model(x, t, y), model(x, t, None)
            assert out.shape == null.shape == (2, C_out, size, size)
            assert torch.isfinite(out).all() and not torch.allclose(out, null)  # the label is used
            assert torch.allclose(null, model(x, t, torch.full_like(y, model.num_classes)),
                                  atol=1e-6)


@pytest.mark.parametrize("name", TINY)
def test_tiny_init_is_deterministic(name):
    a, b, c = build(name, seed=0).state_dict(), build(name, seed=0).state_dict(), build(name, seed=1).state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("name", TINY)
def test_tiny_checkpoint_round_trip(name, tmp_path, perturb):
    kwargs = dict(input_size=8, in_channels=3, num_classes=10)
    model = perturb(build(name, **kwargs), 0.02, seed=2).eval()
    state = model.state_dict()
    torch.save({"model": state, "ema": state, "args": {"res": 8}, "model_name": name,
                "model_kwargs": kwargs},
               tmp_path / "ckpt.pt")
    loaded, ckpt = load_model(str(tmp_path / "ckpt.pt"), name=name)
    x, t, y = inputs(model)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x, t, y), model(x, t, y))


@pytest.mark.parametrize("name", TINY)
def test_tiny_loss_falls(name, one_thread):
    # A few Adam steps on one fixed batch with fixed noise and times: the objective's loss must
    # fall by 10% within 8 (measured: after 1 step for DiM and LaMamba, 8 for DiMSUM, at 0.74).
    model = build(name)
    diffusion = create_diffusion(model)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 3, 8, 8, generator=g).clamp(-1, 1)
    y = torch.randint(0, 10, (4,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.rand(4, generator=g) if model.objective == "flow" else torch.randint(0, 1000, (4,), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = diffusion.training_loss(model, x0, y, noise=noise, t=t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] < 0.9 * losses[0]:
            break
    assert losses[-1] < 0.9 * losses[0], losses


def test_video_is_declared_by_the_model():
    # train.py --video asks takes_clips(name), which reads the class attribute `video`; no TypeError
    # guessing
    assert takes_clips("BiDiM-T/2") and takes_clips("bidim") and not takes_clips("DiT-T/2")
    assert not any(takes_clips(name) for name in TINY if not name.startswith("BiDiM"))
    with torch.device("meta"):
        model = MODELS["BiDiM-T/2"](input_size=8, in_channels=4, num_classes=0, num_frames=3)
    with torch.no_grad(), ssm.count_scan_flops():
        out = model(torch.empty(2, 4, 3, 8, 8, device="meta"),
                    torch.zeros(2, dtype=torch.long, device="meta"))
    assert out.shape == (2, model.out_channels, 3, 8, 8)


@pytest.mark.parametrize("name", TINY)
def test_tiny_grad_checkpoint_gives_the_same_gradients(name, one_thread, perturb):
    # --grad-checkpoint recomputes every block in the backward: same loss and gradients, less memory
    grads = []
    for checkpointed in (False, True):
        model = perturb(build(name), 0.02, seed=2)
        if checkpointed:
            assert checkpoint_blocks(model) > 0
        x, t, y = inputs(model)
        model(x, t, y).square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7)


class RandomOps(TorchDispatchMode):
    """Records every op that draws random numbers."""
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.split("::")[-1].rstrip("_") in ("bernoulli", "rand", "randn", "randint",
                                                           "normal", "uniform", "native_dropout"):
            self.ops.append(str(func))
        return func(*args, **kwargs or {})


@pytest.mark.parametrize("name", TINY)
def test_grad_checkpointed_backward_draws_no_random_numbers(name, one_thread, perturb):
    # A checkpointed block that drew random numbers (DiMSUM's stochastic depth did) is recomputed by
    # resetting the generator to its state at the forward, which a CUDA graph's capture does not
    # allow: train.py --grad-checkpoint --cuda-graph then fell back to running without a graph.
    model = perturb(build(name), 0.02, seed=2).train()
    assert checkpoint_blocks(model) > 0
    x, t, y = inputs(model)
    with RandomOps() as forward:
        loss = model(x, t, y).square().mean()
    with RandomOps() as backward:
        loss.backward()
    assert backward.ops == []
    if name.startswith("DiMSUM"):  # its stochastic depth still draws, in the forward, outside blocks
        assert model.blocks[-1].drop_rate > 0
        assert any(op.startswith("aten.bernoulli") for op in forward.ops)


class HostTensors(TorchDispatchMode):
    """Records every op that reads a CPU tensor (more than a scalar) while the model runs on another
    device: a host-to-device transfer, which a CUDA graph cannot hold."""
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        leaves = tree_leaves((args, kwargs or {}))
        if any(isinstance(a, torch.Tensor) and a.device.type == "cpu" and a.dim() > 0
               for a in leaves):
            self.ops.append(str(func))
        return func(*args, **kwargs or {})


@pytest.mark.parametrize("name", [n for n in TINY if not n.startswith("LaMamba")])
def test_compiled_whole_model_is_traced_once(name, perturb, graph_counter):
    # torch.compile(model) (DiT's --compile auto, anyone's --compile model): the per-grid tables and
    # embeddings (dit.cached) are built in the graph, so the second call finds the first's graph.
    # (LaMamba: one stage, in tests/test_lamamba.py; its whole model takes ~50 s to trace.)
    counting_backend, graphs = graph_counter
    model = perturb(build(name), 0.02).eval()
    x, t, y = inputs(model)
    compiled = torch.compile(model, backend=counting_backend)
    with torch.no_grad():
        outs = [compiled(x, t, y) for _ in range(2)]
        eager = model(x, t, y)
    assert len(graphs) == 1
    for out in outs:
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", TINY)
def test_training_step_reads_nothing_from_the_host(name, monkeypatch):
    # train.py --cuda-graph (models.cuda_graph) replays the loss, forward and backward as one CUDA
    # graph: after the first call (caches filled) they must run on the device alone. Checked on
    # the meta device through the GPU's code path (the Triton ops' shape-only implementations).
    pytest.importorskip("triton")
    monkeypatch.setenv("DIFFUSION_MAMBA_SCAN", "triton")
    with torch.device("meta"):
        model = build(name, input_size=16, in_channels=4)
    diffusion = create_diffusion(model)
    x, y = torch.empty(2, 4, 16, 16, device="meta"), torch.zeros(2, dtype=torch.long, device="meta")
    diffusion.training_loss(model, x, y).backward()
    with HostTensors() as mode:
        diffusion.training_loss(model, x, y).backward()
        with torch.no_grad():  # a sampling step's call
            model(x, torch.zeros(2, dtype=torch.long, device="meta") if model.objective == "eps"
                  else torch.zeros(2, device="meta"), None)
    assert mode.ops == []


class Concatenations(TorchDispatchMode):
    """Records the shape of every torch.cat's output."""
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **kwargs or {})
        if func is torch.ops.aten.cat.default:
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("name", [n for n in TINY if n.startswith(("DiM-", "DiMSUM-"))])
def test_backward_concatenates_no_in_proj_gradient(name, monkeypatch):
    # ssm.Mamba's in_proj is two products (ssm.split_linear), so the gradients of its halves (from
    # the scan's and the conv's backward, GPU kernels) are not first concatenated into one (B, L,
    # 2 d_inner) copy, the widest activation of a block. Meta tensors, the GPU's code path.
    monkeypatch.setenv("DIFFUSION_MAMBA_SCAN", "triton")
    with torch.device("meta"):
        model = build(name, input_size=16, in_channels=4)
    widths = {m.in_proj.out_features for m in model.modules() if type(m) is ssm.Mamba}
    x, y = torch.empty(2, 4, 16, 16, device="meta"), torch.zeros(2, dtype=torch.long, device="meta")
    loss = create_diffusion(model).training_loss(model, x, y)
    with Concatenations() as cats:
        loss.backward()
    assert widths and cats.shapes  # (other concatenations remain: dt, B and C's gradients)
    activations = [s for s in cats.shapes if len(s) > 2 and s[0] == len(x)]  # (batch, ...)
    assert [s for s in activations if s[-1] in widths] == []


def test_graphed_model_without_a_gpu_runs_eagerly_after_one_warning():
    # sample.py's GraphedModel: a signature that cannot be captured (here: no CUDA) runs the model
    # itself, with one warning, and gives its outputs
    model = build("DiM-T/2").eval()
    graphed = GraphedModel(model)
    x, t, y = inputs(model)
    with pytest.warns(UserWarning, match="could not capture a CUDA graph"):
        out = graphed(x, t, y)
    with torch.no_grad():
        assert torch.equal(out, model(x, t, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(graphed(x, t, y), out) and graphed.patch_size == model.patch_size
