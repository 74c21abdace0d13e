"""
BiDiM: "Scaling Diffusion Mamba with Bidirectional SSMs for Efficient Image and Video Generation".
Mo & Tian, arXiv 2405.15881 (called "DiM" in the paper; not Teng et al.'s DiM, which is dim.py). No
official code.

What is known about the paper (its abstract and summaries of its text; [V]: verified in MAGI, Zhou
et al. 2025, Table 3): DiT's self-attention is replaced by Mamba blocks that scan the
token sequence forward and reversed, flip the backward output back and *sum* the two [S]; latent
diffusion in the SD KL-f8 VAE with patchified latents and positional embeddings [S]; a "class token"
carries the label [S]; images on ImageNet and unconditional 16-frame video on UCF-101 (FVD 358.8 at
256^2, SD-1.4 VAE) [V]; linear cost in tokens. Unknown: how t and y enter, whether blocks keep an
MLP, the config table, the recipe, the video token order. Everything below marked [P] is therefore
this project's choice, made to be DiT with one part swapped, so that a comparison with dit.py
isolates the mixer:

  1. [P] patchify each frame (Conv2d, stride p) and add a frozen 2-D sin-cos positional embedding computed for the
     grid at call time (any resolution runs); video adds a 1-D sin-cos embedding of the frame index (below);
  2. [P] N adaLN-Zero blocks exactly as DiT's (affine-free LN modulated by shift/scale from c = t-embedding +
     label embedding, gated residuals, zero-initialised modulation; 4x tanh-GELU MLP kept), with self-attention
     replaced by BiMamba. The label enters through adaLN like DiT's, not as the [S] class token: adaLN is how the
     rest of the project conditions, and a prefix token would be read first by one scan and last by the other;
  3. [P] DiT's final layer (adaLN + linear to p*p*2C: epsilon and the learned-range variance), unpatchify.

BiMamba is Vim's "bimamba v2" mixer (hustvl/Vim, mamba_simple.py), built on ssm.py's Mamba: in_proj
(D -> 2*d_inner, giving x and the gate z) and out_proj are shared; the forward branch (conv1d,
x_proj, dt_proj, A_log, D) scans x in token order, the backward branch (conv1d_b, x_proj_b,
dt_proj_b, A_b_log, D_b, Vim's names) scans flip(x) gated by flip(z); y = y_fwd + flip(y_bwd) goes
through out_proj. Summed, not halved (Vim's optional if_divide_out), as the [S] description says;
with adaLN-Zero gates starting at zero the factor 2 is learned away anyway. So every token sees the
whole sequence: the tokens before it through the forward scan, those after it through the backward
one. Mamba-1 defaults (d_state 16, d_conv 4, expand 2, dt_rank ceil(D/16)) and Mamba's own
initialisation in both branches [P]. DiT's blanket xavier init is applied to every Linear *outside*
the mixers only: it would overwrite dt_proj's weight and its inverse-softplus bias, which set the
scan's time scales.

Video [P]. A model built with num_frames takes clips (N, C, T, H, W) and runs the same blocks over
ONE sequence of T*h*w tokens in frame-major raster order: all tokens of frame 0 row by row, then
frame 1, ... (index (f*h + i)*w + j). Why this order: within a frame the sequence is exactly the
image model's, so spatial neighbours in a row stay adjacent where the causal conv and the
fast-decaying state channels see them, and a token meets the same place in the previous frame h*w
steps back, a distance the slow channels (dt down to 1e-3) carry; the reverse branch then runs the
clip backwards in time, from the last frame's bottom-right token, so with both directions every
token sees the whole clip, as attention over all T*h*w tokens would. The alternative, time-fastest
order, puts a token's T temporal neighbours adjacent but its vertical neighbours T*w steps apart.
Frame index: a fixed 1-D sin-cos embedding (all D channels) added to the spatial one [P], rather
than a learned table of num_frames rows: it has no parameters, so clips of any length run
(num_frames is the trained length, a default for samplers, and is never enforced), and a 1-frame
clip gets the image embedding plus a constant. Video is conditioned like images: y of a
class-conditional dataset, or y = None / num_classes=0 for unconditional video (UCF-101 in the
paper). Shapes are never guessed: a video model given a 4-D batch and an image model given a 5-D
clip raise ValueError.

Cost (`flops`, MACs as DiT counts, the selective scan counted as b*d*L*(9N + 1) + b*d*L for the z
gate, VMamba's formula also used by bench.py). Per block and token the mixer and MLP cost ~14D^2 of
linears plus 2 branches of x_proj, dt_proj, conv and scan, against DiT's 12D^2 + 2*T*D: at 256 px
(256 tokens at p = 2) BiDiM is ~20% MORE expensive than DiT at the same width and depth, and cheaper
only beyond T ~ 1.5*D tokens (~1,700 for XL: ~650 px, or 16-frame video). Measured on SD-VAE latents
(4 channels, a res/8 grid), 1000 classes:

    config       params   GMACs 256 / 512 / 1024 px | DiT same size: params, GMACs 256 / 512 / 1024 px
    BiDiM-S/2     38.3M    7.44 /  29.7 /   119     | 32.9M,   6.06 /  31.4 /  242
    BiDiM-B/2    150.0M   28.0  / 112.0 /   448     | 130.3M, 23.0  / 106.4 /  657
    BiDiM-L/2    526.1M   98.2  / 392.2 / 1,568     | 457.8M, 80.7  / 361.0 / 2,062
    BiDiM-XL/2   774.7M  144.2  / 576.1 / 2,304     | 674.8M, 118.6 / 524.5 / 2,909
    BiDiM-XL/4   774.9M   36.2  / 144.2 /   576     | 675.0M, 29.0  / 118.7 /  525

(DiT counted with the same counter; it reproduces DiT's published 6.06 / 23.01 / 80.7 / 118.6 at 256
px. Params exclude DiT's stored pos_embed, which both files compute instead.) The image figure at
1024 px (4,096 tokens) is also the cost of a 16-frame 256 px clip at p = 2, the paper's UCF-101
setting. Fewer MACs is not less time: bench.py on one H100 (bf16, mamba-ssm's CUDA scan, train step
per image) gave BiDiM-XL/2 35.7 / 48.7 / 172 / 590 ms against DiT-XL/2's 15.4 / 23.2 / 74.9 / 532 ms
at 256 / 512 / 1024 / 2048 px (peak memory 58 vs 33 GiB at 2048): two memory-bound scans per block
against flash attention.

Training defaults are DiT's (AdamW 1e-4, no weight decay, no warm-up, EMA 0.9999, label dropout 0.1,
linear betas, epsilon + learned sigma, model sees t in 0..999); nothing of the paper's recipe is
known. DiT clips no gradients; grad_clip = 1e6 is never reached and only satisfies train.py's "> 0"
test.
"""
import torch
import torch.nn as nn

from dit import (DiT, FinalLayer, LabelEmbedder, Mlp, PatchEmbed, TimestepEmbedder,
                 adaln_zero, cached, get_1d_sincos_pos_embed, get_2d_sincos_pos_embed)
from ssm import (Mamba, causal_conv_silu, count_scan_flops, mamba_scan, recompute_around_scan,
                 scan_dtype, token_backend)


#################################################################################
#                      Bidirectional Mamba mixer (Vim v2)                        #
#################################################################################

class BiMamba(Mamba):
    """Vim's bimamba-v2: shared in/out projections; a forward branch and a backward one over the
    reversed tokens."""
    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, backend=None):
        super().__init__(d_model, d_state=d_state, d_conv=d_conv, expand=expand, backend=backend)
        # The backward branch gets its own conv, projections, A and D, initialised exactly as Mamba
        # initialises the forward one (dt spread, S4D-real A, no-weight-decay flags): take them from
        # a second Mamba, drop the rest.
        twin = Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand)
        self.conv1d_b, self.x_proj_b, self.dt_proj_b = twin.conv1d, twin.x_proj, twin.dt_proj
        self.A_b_log, self.D_b = twin.A_log, twin.D

    def branch(self, x, z, order, conv1d, x_proj, dt_proj, A_log, D):
        """One direction, Mamba's inner path along `order` (None: token order): causal conv,
        input-dependent (dt, B, C), scan gated by silu(z). x, z: (N, L, d_inner) views -> (N, L,
        d_inner), in token order."""
        x = causal_conv_silu(x, conv1d.weight, conv1d.bias, order, self.backend)
        dt, B, C = torch.split(x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = dt @ dt_proj.weight.t()  # bias added in fp32 by the scan
        return mamba_scan(x, dt, -torch.exp(A_log.float()), B, C, D.float(), z,
                          dt_proj.bias.float(), order, self.backend)

    def forward(self, x):
        """x: (N, L, D) -> (N, L, D)."""
        # with the Triton scan the mixer keeps only its input and the two scans' outputs for the
        # backward: in_proj, both branches up to their scans and out_proj run again
        # (ssm.recompute_around_scan). out_proj inside, so that its input, the sum of the branches, is
        # added again rather than kept (N, L, d_inner); out_proj's product is repeated instead.
        if token_backend(x, self.d_state, self.backend, scan_dtype) == "triton":
            return recompute_around_scan(self.mix, x)
        return self.mix(x)

    def mix(self, x):
        """in_proj, the forward and the backward branch, summed, then out_proj: (N, L, D) -> (N, L, D)."""
        x, z = self.in_proj(x).chunk(2, dim=-1)  # (N, L, d_inner) views
        # the backward branch reads the tokens last to first (its conv too) and writes each output
        # back in place: no flipped copies of x, z or y
        reverse = torch.arange(x.shape[1] - 1, -1, -1, device=x.device, dtype=torch.int32)
        y = self.branch(x, z, None, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        y = y + self.branch(x, z, reverse, self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log,
                            self.D_b)
        return self.out_proj(y)


#################################################################################
#                                 Core BiDiM block                              #
#################################################################################

class BiDiMBlock(nn.Module):
    """DiT's adaLN-Zero block with the self-attention replaced by BiMamba."""
    def __init__(self, hidden_size, mlp_ratio=4.0, d_state=16, d_conv=4, expand=2):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mixer = BiMamba(hidden_size, d_state=d_state, d_conv=d_conv, expand=expand)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        """x: (N, L, D) tokens, c: (N, D) condition."""
        return adaln_zero(x, c, self.adaLN_modulation, self.norm1, self.mixer, self.norm2, self.mlp)


#################################################################################
#                                  BiDiM network                                #
#################################################################################

class BiDiM(nn.Module):
    """Diffusion Mamba with bidirectional SSMs (Mo & Tian) on images (N, C, H, W) or, with
    num_frames, clips (N, C, T, H, W); model(x, t, y) -> (epsilon, variance interpolation), 2C
    channels, same shape."""
    objective = "eps"
    schedule = "linear"             # DiT's linear betas, 1e-4 to 0.02 over 1000 steps
    time_offset = 0                 # the network sees the DDPM index 0..999
    # built with num_frames=T it takes clips (train.py --video reads this)
    video = True
    # DiT's recipe (the paper's is unknown); DiT clips no gradients (grad_clip 0 is off).
    train_defaults = dict(lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, warmup=0,
                          grad_clip=0.0, label_dropout=0.1, ema=0.9999)

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 mlp_ratio=4.0,
                 num_classes=1000, num_frames=None, learn_sigma=True, d_state=16, d_conv=4,
                 expand=2):
        super().__init__()
        if num_frames is not None and num_frames < 1:
            raise ValueError(f"num_frames must be None (image model) or >= 1, got {num_frames}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.hidden_size, self.depth, self.num_classes, self.num_frames = hidden_size, depth, num_classes, num_frames

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.blocks = nn.ModuleList([BiDiMBlock(hidden_size, mlp_ratio, d_state, d_conv, expand)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self._pos_cache = {}
        self.initialize_weights()

    def initialize_weights(self):
        # DiT's init (the same embedders, adaLN-Zero blocks and final layer) outside the mixers, which
        # keep Mamba's init (dt_proj's weight range and inverse-softplus bias set the scan's time scales)
        DiT.initialize_weights(self, keep=[block.mixer for block in self.blocks])

    def pos_embed(self, frames, h, w, device):
        """Frozen (1, L, D) sin-cos embedding in token order: the 2-D one of the h x w grid, plus
        for video the 1-D one of the frame index (frame-major, L = frames*h*w). Cached per shape and
        device."""
        def build():
            emb = get_2d_sincos_pos_embed(self.hidden_size, h, w, device)  # (h*w, D)
            if self.num_frames is not None:
                # (T, D)
                time = get_1d_sincos_pos_embed(self.hidden_size,
                                               torch.arange(frames, device=device)).float()
                emb = (time[:, None] + emb[None]).reshape(frames * h * w, -1)  # frame-major
            return emb[None]

        return cached(self._pos_cache, (frames, h, w, str(device)), build)

    def unpatchify(self, x, h, w):
        """(M, h*w, p*p*C_out) -> (M, C_out, h*p, w*p)."""
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def check_input(self, x):
        """Clear errors for inputs of the wrong kind or size; returns the number of frames (1 for
        images)."""
        p, C = self.patch_size, self.in_channels
        video = self.num_frames is not None
        if video and x.dim() != 5:
            raise ValueError(f"this BiDiM is a video model (num_frames={self.num_frames}) and "
                             "expects clips "
                             f"(N, {C}, T, H, W); got a {x.dim()}-D tensor {tuple(x.shape)} (add a "
                             "frame axis "
                             "at dim 2 for single frames)")
        if not video and x.dim() != 4:
            raise ValueError(f"this BiDiM is an image model (num_frames=None) and expects (N, {C}, "
                             "H, W); got a "
                             f"{x.dim()}-D tensor {tuple(x.shape)} (build it with num_frames=T for "
                             "clips)")
        H, W = x.shape[-2:]
        if x.shape[1] != C or H % p or W % p or H == 0 or W == 0 or (video and x.shape[2] == 0):
            raise ValueError(f"BiDiM expects {C} channels and H, W positive multiples of the patch "
                             f"size {p}, "
                             f"got {tuple(x.shape)}")
        return x.shape[2] if video else 1

    def forward(self, x, t, y=None):
        """x: (N, C, H, W), or (N, C, T, H, W) for a video model, H and W multiples of patch_size;
        t: (N,) DDPM index; y: (N,) labels or None (null class). Returns (N, 2C, ...) of x's spatial
        shape."""
        frames = self.check_input(x)
        N, p = x.shape[0], self.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        if y is None:
            y = torch.full((N,), self.num_classes, dtype=torch.long, device=x.device)
        t = t.expand(N) if t.dim() == 0 else t
        if x.dim() == 5:
            x = x.transpose(1, 2).flatten(0, 1)                                  # (N*T, C, H, W)

        # (N, L, D), frame-major raster
        x = self.x_embedder(x).reshape(N, frames * h * w, -1)
        x = x + self.pos_embed(frames, h, w, x.device)
        c = self.t_embedder(t) + self.y_embedder(y)                              # (N, D)
        for block in self.blocks:
            x = block(x, c)                                                      # (N, L, D)
        x = self.final_layer(x, c)                                               # (N, L, p*p*C_out)
        # (N*T, C_out, H, W)
        x = self.unpatchify(x.reshape(N * frames, h * w, -1), h, w)
        if self.num_frames is not None:
            # (N, C_out, T, H, W)
            x = x.unflatten(0, (N, frames)).transpose(1, 2)
        return x


#################################################################################
#                                      Cost                                     #
#################################################################################

def flops(model, input_size=None, num_frames=None, batch_size=1):
    """(total, scan) GMACs of one forward pass (DiT's "GFLOPs" convention: a multiply-add counts
    once) at input_size (latent side; default model.input_size) and, for a video model, num_frames
    (default model's). Linears and convolutions are counted by torch's FlopCounterMode, the
    selective scan by ssm.count_scan_flops. Works on the meta device: build the model under `with
    torch.device("meta")` for an instant count."""
    from torch.utils.flop_counter import FlopCounterMode
    size = input_size or model.input_size
    frames = num_frames or model.num_frames
    device = next(model.parameters()).device
    shape = (batch_size,
             model.in_channels) + ((frames,) if model.num_frames is not None else ()) + (size, size)
    x, t = torch.zeros(shape, device=device), torch.zeros(batch_size, dtype=torch.long,
                                                          device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter, count_scan_flops() as scans:
        model(x, t, t)
    return counter.get_total_flops() / 2e9 + scans.macs / 1e9, scans.macs / 1e9


#################################################################################
#                                  BiDiM configs                                #
#################################################################################
# [P] DiT's depth/width grid; patch sizes 2, 4 and 8 as DiT's. Mamba-1 defaults in every config.

def BiDiM_XL_2(**kwargs):
    return BiDiM(depth=28, hidden_size=1152, patch_size=2, **kwargs)

def BiDiM_XL_4(**kwargs):
    return BiDiM(depth=28, hidden_size=1152, patch_size=4, **kwargs)

def BiDiM_XL_8(**kwargs):
    return BiDiM(depth=28, hidden_size=1152, patch_size=8, **kwargs)

def BiDiM_L_2(**kwargs):
    return BiDiM(depth=24, hidden_size=1024, patch_size=2, **kwargs)

def BiDiM_L_4(**kwargs):
    return BiDiM(depth=24, hidden_size=1024, patch_size=4, **kwargs)

def BiDiM_B_2(**kwargs):
    return BiDiM(depth=12, hidden_size=768, patch_size=2, **kwargs)

def BiDiM_B_4(**kwargs):
    return BiDiM(depth=12, hidden_size=768, patch_size=4, **kwargs)

def BiDiM_S_2(**kwargs):
    return BiDiM(depth=12, hidden_size=384, patch_size=2, **kwargs)

def BiDiM_S_4(**kwargs):
    return BiDiM(depth=12, hidden_size=384, patch_size=4, **kwargs)

def BiDiM_T_2(**kwargs):
    """Tiny config for tests and CPU runs."""
    return BiDiM(depth=4, hidden_size=64, patch_size=2, **kwargs)


BiDiM_models = {
    "BiDiM-XL/2": BiDiM_XL_2, "BiDiM-XL/4": BiDiM_XL_4, "BiDiM-XL/8": BiDiM_XL_8,
    "BiDiM-L/2": BiDiM_L_2, "BiDiM-L/4": BiDiM_L_4, "BiDiM-B/2": BiDiM_B_2, "BiDiM-B/4": BiDiM_B_4,
    "BiDiM-S/2": BiDiM_S_2, "BiDiM-S/4": BiDiM_S_4, "BiDiM-T/2": BiDiM_T_2,
}
