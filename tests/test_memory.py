"""tools/memory.py: what a training step keeps for its backward, counted on a CPU."""
import os

import ssm_triton
from tools import memory


def test_kept_bytes_scale_with_the_latent_area():
    # the estimate extrapolates linearly from two grids: a third grid's count must lie on that line
    counts = {g: memory.kept_bytes("DiT-T/2", g, "none") for g in (8, 16, 24)}
    slope = (counts[16] - counts[8]) / (16 ** 2 - 8 ** 2)
    predicted = counts[16] + slope * (24 ** 2 - 16 ** 2)
    assert counts[8] < counts[16] < counts[24]
    assert abs(predicted - counts[24]) / counts[24] < 0.03, (predicted, counts)


def test_stand_in_kernels_are_put_back():
    # Mamba models through the scan and conv ops with the kernels stood in (LaMamba's 2-D depthwise
    # conv too: until session 29 its launcher ran and failed on a CPU); afterwards the real
    # launchers and the backend choice are back (other tests run the kernels)
    before = {k: getattr(ssm_triton, k) for k in memory.STOOD_IN}
    env = os.environ.get("DIFFUSION_MAMBA_SCAN")
    assert memory.kept_bytes("DiM-T/2", 8, "blocks") > 0
    assert memory.kept_bytes("LaMamba-T", 8, "none") > 0
    assert all(getattr(ssm_triton, k) is fn for k, fn in before.items())
    assert os.environ.get("DIFFUSION_MAMBA_SCAN") == env


def test_live_storages_count_what_a_recomputed_region_keeps():
    # a selective checkpoint (ssm.recompute_around_scan's kind) keeps its matmul's output outside
    # autograd's saved tensors: a saved-tensor hook misses it, the live count must not
    import functools

    import torch
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
    policy = lambda ctx, op, *a, **k: (CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.mm.default
                                       else CheckpointPolicy.PREFER_RECOMPUTE)
    w, x = torch.randn(64, 32, requires_grad=True), torch.randn(128, 64, requires_grad=True)
    hooked = []
    with memory.LiveStorages() as live, torch.autograd.graph.saved_tensors_hooks(
            lambda t: hooked.append(t.untyped_storage().nbytes()) or t, lambda t: t):
        y = checkpoint(lambda x: torch.sin(x @ w), x, use_reentrant=False, preserve_rng_state=False,
                       context_fn=functools.partial(create_selective_checkpoint_contexts, policy))
        kept = live.nbytes() - y.untyped_storage().nbytes()
    assert kept == 128 * 32 * 4  # the product, kept by the policy: the sine runs again from it
    assert 128 * 32 * 4 not in hooked


def test_grad_checkpoint_keeps_a_mamba_block_to_its_inputs():
    # --grad-checkpoint recomputes each block whole, the scan included (ssm.recompute_around_scan
    # stands aside): a DiM step keeps little more than its blocks' fp32 inputs. Before session 20 the
    # mixer's own policy kept the scan's outputs inside the block's checkpoint as well: 0.83x of a
    # step without the option for DiM-T/2 (0.78x for DiM-S/2), now 0.43x (0.34x).
    per_pixel = {}
    for checkpointed in (False, True):
        small, large = (memory.kept_bytes("DiM-T/2", g, "blocks", checkpointed) for g in (8, 16))
        per_pixel[checkpointed] = (large - small) / (16 ** 2 - 8 ** 2)
    assert per_pixel[True] < 0.5 * per_pixel[False], per_pixel
