"""
LaMamba-Diff: Linear-Time High-Fidelity Diffusion Models Based on Local Attention and Mamba.
Fu, Chen & Yu, arXiv 2408.02615; official code yunxiangfu2001/LaMamba-Diff (commit 27b3c1d), whose
SS2D comes from VMamba (Liu et al., arXiv 2401.10166) and whose window attention from Swin (Liu et
al., arXiv 2103.14030).

The released network (class LaMambaDiff, configs/LaMamba-DIff-XL.yaml) written as one readable
module instead of 1,500 + 1,770 lines copied from a classifier codebase. A U-Net over SD-VAE
latents, channels-last throughout:

  1. stem: 1x1 conv (patch size 1, one token per latent pixel) + LayerNorm, plus a learned position embedding
     initialised with 2-D sin-cos;
  2. encoder: four stages of widths C, 2C, 4C, 4C and 2 blocks each; patch merging (2x2 -> LN -> linear) after
     the first two stages only, so a 32x32 latent runs at 32, 16, 8, 8;
  3. a 2-block bottleneck wrapped in an extra residual, x + mid(x);
  4. decoder: the mirror image, each stage one block deeper (3 blocks, the SD U-Net habit), patch expanding
     (linear -> 2x2 depth-to-space -> LN) before the last two stages; every encoder stage's output is *added* to
     the input of its mirrored decoder stage;
  5. head: linear + LN, then an adaLN-modulated affine-free LN and a linear to 2 x in_channels (eps + variance).

Each LaMamba block is three adaLN-Zero residual sub-layers in sequence, modulated by one 9-way
projection of the condition (time + class): SS2D (four snake-order selective scans over the map,
summed), Swin window attention (8x8 windows, alternating shift, relative position bias; global when
the map is no larger than a window), MLP.

Differences from the official code, all deliberate: the scan orders are precomputed once per grid
instead of on every call; attention runs through torch's scaled_dot_product_attention; any grid
whose sides are multiples of 4 works (the position embedding is resized, maps that are not multiples
of the window are padded, and the snake scans and window masks are built for the actual, possibly
rectangular, map), while the official model only runs at the one square size it was built for; the
SSM state size defaults to 16, what the paper's FLOP counts imply, not the released yaml's 1 (pass
d_state=1 for that). `load_official_state_dict` maps the official names.
"""
import math
import re
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from dit import LabelEmbedder, TimestepEmbedder, cached
from ssm import (count_scan_flops, depthwise_conv2d_silu, init_dt_A_D, mamba_scan, recompute_around_scan,
                 scan_dtype, split_linear, sum_norm_gate, token_backend)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


#################################################################################
#                     Snake scans, windows and their masks                      #
#################################################################################

# Index tensors depend only on the grid and the device: each is built once, on the device
# (dit.cached; in a graph that torch.compile traces they are built in the graph instead).
_index_cache = {}


def snake_paths(h, w, device=None):
    """The four continuous ("snake") scan orders of an h x w map stored row-major, as a (4, h*w)
    index tensor whose row k lists the pixels in the order scan k visits them (official
    model/continuous_scan.py):
      0. rows from the top, the first going right, each next row back the other way;
      1. rows from the bottom, the first going right;
      2. columns from the left, the first going up from the bottom;
      3. columns from the right, the first going up.
    Consecutive tokens are always spatial neighbours. For an even number of rows scan 1 is scan 0
    reversed, and for an even number of columns scan 3 is scan 2 reversed."""
    r = torch.arange(h, device=device)[:, None].expand(h, w)
    c = torch.arange(w, device=device)[None, :].expand(h, w)
    # (h, w): row i of the path walks these columns
    c_snake = torch.where(r % 2 == 0, c, w - 1 - c)
    # (h, w): column j of the path walks these rows
    r_snake = torch.where(c % 2 == 0, r, h - 1 - r)
    rows_top = r * w + c_snake                                         # [step row, step col]
    rows_bottom = (h - 1 - r) * w + c_snake
    cols_left = ((h - 1 - r_snake) * w + c).t()                        # [step col, step row]
    cols_right = ((h - 1 - r_snake) * w + (w - 1 - c)).t()
    return torch.stack([p.reshape(-1) for p in (rows_top, rows_bottom, cols_left, cols_right)])


def window_layout(h, w, window_size, shift):
    """Window (wh, ww) and shift (sh, sw) for an h x w map. As in the official block, an axis no
    longer than the window is covered by one window and not shifted (at 256 px the 8x8 stages attend
    globally)."""
    wh, ww = min(window_size, h), min(window_size, w)
    sh = shift if h > window_size else 0
    sw = shift if w > window_size else 0
    return wh, ww, sh, sw


def window_partition(x, wh, ww):
    """(B, H, W, C) -> (B, nW, wh*ww, C), windows in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // wh, wh, W // ww, ww, C).transpose(2, 3)
    return x.reshape(B, (H // wh) * (W // ww), wh * ww, C)


def window_reverse(windows, wh, ww, H, W):
    """(B, nW, wh*ww, C) -> (B, H, W, C)."""
    B, C = windows.shape[0], windows.shape[-1]
    x = windows.view(B, H // wh, W // ww, wh, ww, C).transpose(2, 3)
    return x.reshape(B, H, W, C)


def relative_position_index(wh, ww, window_size, device=None):
    """(wh*ww, wh*ww) index of each (query, key) offset into a (2*window_size-1)^2 bias table
    (Swin's layout)."""
    rows, cols = torch.arange(wh, device=device), torch.arange(ww, device=device)
    coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij")).flatten(1)  # (2, N)
    # (2, N, N), offsets shifted to >= 0
    rel = coords[:, :, None] - coords[:, None, :] + (window_size - 1)
    return rel[0] * (2 * window_size - 1) + rel[1]


MASKED = -100.0  # Swin's additive mask value, as the official code uses


def shifted_window_mask(h, w, wh, ww, sh, sw, device=None):
    """(nW, N, N) additive mask for the padded, rolled map: MASKED between tokens that fall in one
    window only because of the cyclic roll (they lie on opposite sides of the seam), and for padded
    keys; 0 elsewhere."""
    hp, wp = math.ceil(h / wh) * wh, math.ceil(w / ww) * ww

    # Swin's three slices of the rolled axis: [0, n-win), [n-win, n-shift), [n-shift, n)
    def regions(n, win, shift):
        label = torch.zeros(n, dtype=torch.long, device=device)
        if shift:
            label[n - win:n - shift] = 1
            label[n - shift:] = 2
        return label

    region = regions(hp, wh, sh)[:, None] * 3 + regions(wp, ww, sw)[None, :]            # (hp, wp)
    # rolled position i holds original position (i + shift) mod n; those past the map are padding
    pad = (((torch.arange(hp, device=device) + sh) % hp >= h)[:, None]
           | ((torch.arange(wp, device=device) + sw) % wp >= w)[None, :])
    region = window_partition(region[None, :, :, None], wh, ww)[0, :, :, 0]             # (nW, N)
    pad = window_partition(pad[None, :, :, None], wh, ww)[0, :, :, 0]                   # (nW, N)
    blocked = (region[:, :, None] != region[:, None, :]) | pad[:, None, :]
    return blocked.float() * MASKED


def snake_table(h, w, device):
    """snake_paths(h, w) as the scan kernels read it: (4, h*w) int32 on `device`, built once."""
    return cached(_index_cache, ("snake", h, w, str(device)),
                  lambda: snake_paths(h, w, device).to(torch.int32))


def window_tables(h, w, window_size, shift, device):
    """What window attention over an h x w map with this nominal shift indexes: the relative
    position index (N, N) and the shift/padding mask (nW, N, N), built once per layout."""
    wh, ww, sh, sw = window_layout(h, w, window_size, shift)
    index = cached(_index_cache, ("relpos", wh, ww, window_size, str(device)),
                   lambda: relative_position_index(wh, ww, window_size, device))
    mask = cached(_index_cache, ("mask", h, w, wh, ww, sh, sw, str(device)),
                  lambda: shifted_window_mask(h, w, wh, ww, sh, sw, device))
    return index, mask


#################################################################################
#                        SS2D and window attention                              #
#################################################################################

class SS2D(nn.Module):
    """VMamba's 2-D selective scan (forward type v2) with LaMamba's four snake scans, summed; own
    parameters per scan direction. in_proj -> (x, z); x -> depthwise conv -> SiLU -> 4 scans -> sum
    -> LN -> * SiLU(z) -> out_proj."""
    K = 4  # scan directions

    def __init__(self, dim, d_state=16, expand=2, d_conv=3, conv_bias=False, dt_rank="auto",
                 dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4):
        super().__init__()
        self.d_state, self.d_inner = d_state, int(expand * dim)
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else dt_rank
        D, R, K, N = self.d_inner, self.dt_rank, self.K, d_state

        self.in_proj = nn.Linear(dim, 2 * D, bias=False)
        # holds the official conv's weight and bias; scans() applies them with ssm.depthwise_conv2d_silu
        self.conv2d = nn.Conv2d(D, D, d_conv, padding=(d_conv - 1) // 2, groups=D, bias=conv_bias)
        # per-direction x_proj (D -> dt_rank + 2N) and dt_proj (dt_rank -> D), stacked along K
        self.x_proj_weight = nn.Parameter(torch.empty(K, R + 2 * N,
                                                      D).uniform_(-D ** -0.5, D ** -0.5))
        self.dt_projs_weight = nn.Parameter(torch.empty(K, D, R))
        # Mamba's init of dt (weight and bias), A (S4D-real) and D, once per scan direction
        dt_bias, A_log, Ds = init_dt_A_D(self.dt_projs_weight, D, N, R, dt_min, dt_max,
                                         dt_init_floor=dt_init_floor, copies=K)
        self.dt_projs_bias = nn.Parameter(dt_bias)  # (K, D)
        self.A_logs = nn.Parameter(A_log)  # (K * D, N)
        self.Ds = nn.Parameter(Ds)  # (K * D,)
        self.A_logs._no_weight_decay = self.Ds._no_weight_decay = True
        self.out_norm = nn.LayerNorm(D)
        self.out_proj = nn.Linear(D, dim, bias=False)

    def forward(self, x, paths=None):
        """x: (B, H, W, dim) -> (B, H, W, dim); paths: snake_table(H, W) (looked up if not given)."""
        # with the Triton scan only x and the scans' output are kept for the backward: in_proj,
        # the conv, the projections, the sum, out_norm, the gate and out_proj run again
        # (ssm.recompute_around_scan); the kernel is checked in the dtype it reads (the
        # projections', autocast's where it is on), outside the region. The snake orders are looked
        # up outside it too: filling a cache inside a checkpointed region is a side effect, which
        # torch.compile handles badly there (torch 2.11: compiled LaMamba-L's backward failed in an
        # eager recompute of this region)
        B, H, W, _ = x.shape
        paths = snake_table(H, W, x.device) if paths is None else paths  # (K, L)
        if token_backend(x, self.d_state, dtype_of=scan_dtype) == "triton":
            if not torch.is_grad_enabled():
                return self.mix(x, paths, sampling=True)
            return recompute_around_scan(self.mix, x, paths)
        return self.mix(x, paths)

    def mix(self, x, paths, sampling=False):
        """in_proj, the four snake scans along paths (K, H*W), summed and normalised, gated,
        out_proj: (B, H, W, dim) -> (B, H, W, dim). sampling (no gradients, the Triton scan): the
        sum, out_norm and the gate in one kernel (ssm.sum_norm_gate; README, Speed,
        session 25)."""
        B, H, W, _ = x.shape
        # two products (ssm.split_linear): x's gradient comes from the conv's backward kernel, which
        # cannot write into half of a single product's (B, H, W, 2 D) gradient
        x, z = split_linear(x, self.in_proj)                                          # (B, H, W, D)
        if sampling:
            norm = self.out_norm
            y = sum_norm_gate(self.scans(x, paths, sampling=True), z, norm.weight, norm.bias, norm.eps)
            return self.out_proj(y)
        y = self.scans(x, paths)                                     # (B, L, D): the four summed
        y = self.out_norm(y).view(B, H, W, self.d_inner).to(z.dtype)
        return self.out_proj(y * F.silu(z))

    def scans(self, x, paths, sampling=False):
        """x: (B, H, W, D), in_proj's half; paths: (K, H*W) snake orders -> the sum of the four scans'
        outputs, (B, H*W, D), in fp32 (the official cross-merge adds them before out_norm); for
        sampling (see mix) the four apart, (B, H*W, K, D)."""
        B, H, W, _ = x.shape
        D, R, K, N, L = self.d_inner, self.dt_rank, self.K, self.d_state, H * W
        # the conv + SiLU reads and writes the channels-last map: the tokens stay (B, L, D) rows
        x = depthwise_conv2d_silu(x, self.conv2d.weight, self.conv2d.bias).reshape(B, L, D)
        # per-direction x_proj and dt_proj act per token: computed in token order, no gathered
        # copies. The dt rows are zero-padded to a multiple of 8 (dt_rank is 5 for S, 20 for XL):
        # matrices with a row length that is not a multiple of 16 bytes send cuBLAS to its slow
        # unaligned kernels. The padded rows and columns are exact zeros, so the result is the same.
        Rp = -(-R // 8) * 8
        x_proj = torch.cat([self.x_proj_weight[:, :R], self.x_proj_weight.new_zeros(K, Rp - R, D),
                            self.x_proj_weight[:, R:]], 1) if Rp > R else self.x_proj_weight
        # (B, L, K, Rp+2N)
        x_dbl = torch.einsum("bld,kcd->blkc", x, x_proj)
        dts, Bs, Cs = torch.split(x_dbl, [Rp, N, N], dim=-1)
        dt_proj = F.pad(self.dt_projs_weight, (0, Rp - R))
        dts = torch.einsum("blkr,kdr->blkd", dts, dt_proj)                             # (B, L, K, D)
        # the four snake scans in one call, each reading the tokens through its path and writing
        # every output back to the pixel it was read from; in fp32, as the official code forces (or
        # higher: a float64 model stays float64). out_dtype says so: the Triton kernel reads the
        # bf16 activations as they are and scans in fp32 (the same numbers as fp32 copies of them,
        # without the copies: at 2048 px those of dts alone are 512 MiB a layer). The scan op adds
        # the four itself (sum_directions), so the backward keeps their sum, not the four: a quarter
        # of the bytes (at 2048 px 128 MiB instead of 512 in each full-resolution block)
        wide = torch.promote_types(x.dtype, torch.float32)
        f = lambda a: a.to(wide)
        return mamba_scan(x, dts, -torch.exp(f(self.A_logs)).view(K, D, N), Bs, Cs,
                          f(self.Ds).view(K, D), dt_bias=f(self.dt_projs_bias), order=paths,
                          out_dtype=wide, sum_directions=not sampling)


class WindowAttention(nn.Module):
    """Swin (shifted-)window multi-head self-attention with a learned relative position bias."""
    def __init__(self, dim, num_heads, window_size):
        super().__init__()
        self.num_heads, self.window_size = num_heads, window_size
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # one bias per head and relative offset in [-(ws-1), ws-1]^2; a smaller window uses the
        # central part
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def attention_bias(self, index, mask):
        """(nW * heads, N, N): relative position bias plus the shift/padding mask, per window and
        head (index, mask: window_tables)."""
        N = index.shape[0]
        # (heads, N, N)
        bias = self.relative_position_bias_table[index.view(-1)].view(N, N, -1).permute(2, 0, 1)
        # (nW * heads, N, N)
        return (bias[None] + mask[:, None]).flatten(0, 1)

    def forward(self, x, shift, tables=None):
        """x: (B, H, W, C) -> (B, H, W, C); shift: the block's nominal shift (0 or window // 2);
        tables: window_tables(H, W, window_size, shift) (looked up if not given)."""
        B, H, W, C = x.shape
        wh, ww, sh, sw = window_layout(H, W, self.window_size, shift)
        index, mask = tables or window_tables(H, W, self.window_size, shift, x.device)
        hp, wp = math.ceil(H / wh) * wh, math.ceil(W / ww) * ww
        if (hp, wp) != (H, W):  # pad bottom/right; the mask hides the padded keys
            x = F.pad(x, (0, 0, 0, wp - W, 0, hp - H))
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        # (B, nW, N, C)
        windows = window_partition(x, wh, ww)
        nW, N, heads = windows.shape[1], wh * ww, self.num_heads
        qkv = self.qkv(windows).view(B, nW, N, 3, heads, C // heads)
        # windows go on the head axis, so the (nW * heads, N, N) bias broadcasts over the batch
        # alone
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).reshape(3, B, nW * heads, N, C // heads).unbind(0)
        bias = self.attention_bias(index, mask).to(q.dtype)
        # (B, nW * heads, N, hd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.view(B, nW, heads, N, C // heads).transpose(2, 3).reshape(B, nW, N, C)
        x = window_reverse(self.proj(out), wh, ww, hp, wp)
        if sh or sw:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        return x[:, :H, :W]


#################################################################################
#                                LaMamba block                                  #
#################################################################################

class LaMambaBlock(nn.Module):
    """SS2D, window attention and MLP as three adaLN-Zero residual sub-layers sharing one 9-way
    modulation."""
    def __init__(self, dim, cond_dim, num_heads, window_size, shift, d_state, project_condition,
                 mlp_ratio=4.0, d_conv=3, conv_bias=False):
        super().__init__()
        self.shift = shift
        # The condition has width 4C; blocks of another width (and all decoder blocks) project it
        # first, so the condition passes Linear -> SiLU -> Linear, not DiT's SiLU -> Linear.
        self.condition_projection = nn.Linear(cond_dim, dim) if project_condition else nn.Identity()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 9 * dim))
        # the block norms are affine LayerNorms (DiT's are affine-free)
        self.norm_ssm = nn.LayerNorm(dim)
        self.ss2d = SS2D(dim, d_state=d_state, d_conv=d_conv, conv_bias=conv_bias)
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(),
                                             fc2=nn.Linear(hidden, dim)))

    def tables(self, h, w, device):
        """The index tables this block reads at an h x w map: (snake paths, (relative position
        index, window mask))."""
        windows = window_tables(h, w, self.attn.window_size, self.shift, device)
        return snake_table(h, w, device), windows

    def forward(self, x, c, tables=None):
        """x: (B, H, W, dim), c: (B, cond_dim); tables: self.tables(H, W) (looked up if not
        given)."""
        paths, windows = tables or self.tables(x.shape[1], x.shape[2], x.device)
        # (B, 1, 1, 9 dim)
        mod = self.adaLN_modulation(self.condition_projection(c))[:, None, None]
        shift_s, scale_s, gate_s, shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(9, dim=-1)
        x = x + gate_s * self.ss2d(modulate(self.norm_ssm(x), shift_s, scale_s), paths)
        x = x + gate_a * self.attn(modulate(self.norm_attn(x), shift_a, scale_a), self.shift,
                                   windows)
        x = x + gate_m * self.mlp(modulate(self.norm_mlp(x), shift_m, scale_m))
        return x


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> Linear (as a strided conv) -> LayerNorm; channels-last
    output."""
    def __init__(self, in_channels, dim, patch_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x, pos):
        """(B, C_in, H, W) and the (1, H/p, W/p, dim) position embedding -> (B, H/p, W/p, dim).
        The position is added here, so a compiled stem (models.compile_blocks) fuses it."""
        return self.norm(self.proj(x).permute(0, 2, 3, 1)) + pos


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> concat (4C) -> LayerNorm -> Linear to 2C (Swin's v1 downsampling)."""
    def __init__(self, dim, out_dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x):
        """(B, H, W, C) -> (B, H/2, W/2, out_dim); H, W even."""
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                      dim=-1)
        return self.reduction(self.norm(x))


class PatchExpanding(nn.Module):
    """Linear to scale^2 * C / scale channels -> depth-to-space by `scale` -> LayerNorm. scale 2
    halves the width (decoder upsampling); the head uses scale = patch size and keeps the width."""
    def __init__(self, dim, scale=2, out_dim=None):
        super().__init__()
        self.scale, self.out_dim = scale, out_dim or dim // scale
        self.expand = nn.Linear(dim, scale * scale * self.out_dim, bias=False)
        self.norm = nn.LayerNorm(self.out_dim)

    def forward(self, x):
        """(B, H, W, C) -> (B, s H, s W, out_dim)."""
        B, H, W, _ = x.shape
        s = self.scale
        x = self.expand(x).view(B, H, W, s, s,
                                self.out_dim).transpose(2, 3).reshape(B, s * H, s * W, self.out_dim)
        return self.norm(x)


class ModulatedNorm(nn.Module):
    """The head's LayerNorm without affine parameters, then adaLN's shift and scale; a module of its
    own (no parameters, so no state-dict keys) that models.compile_blocks compiles into one pass."""
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)

    def forward(self, x, shift, scale):
        """(B, H, W, C), shift and scale (B, 1, 1, C) -> (B, H, W, C)."""
        return modulate(self.norm(x), shift, scale)


class Stage(nn.Module):
    """A run of LaMamba blocks (shift 0, w/2, 0, ...), with patch merging after (encoder) or
    expanding before."""
    def __init__(self, depth, dim, resample=None, **block_kwargs):
        super().__init__()
        window = block_kwargs["window_size"]
        self.blocks = nn.ModuleList([LaMambaBlock(dim, shift=0 if d % 2 == 0 else window // 2,
                                                  **block_kwargs)
                                     for d in range(depth)])
        self.resample = resample

    def forward(self, x, c):
        # The blocks' index tables are looked up here, once per window shift, and passed in. Inside
        # a block compiled on its own (models.compile_blocks) they would be built in its graph at
        # every call; and when the model is compiled whole, once per shift is all the graph builds.
        tables = {}
        for block in self.blocks:
            if block.shift not in tables:
                tables[block.shift] = block.tables(x.shape[1], x.shape[2], x.device)
            x = block(x, c, tables[block.shift])
        return x


#################################################################################
#                                 LaMamba-Diff                                  #
#################################################################################

class LaMambaDiff(nn.Module):
    """LaMamba-Diff U-Net (Fu et al.): model(x, t, y) -> (N, 2C, H, W), epsilon and the variance
    interpolation."""
    objective = "eps"
    schedule = "linear"
    time_offset = 0
    # DiT's recipe. The official train.py calls AdamW(lr=1e-4) without weight_decay, so it actually
    # ran with PyTorch's default 0.01 while its comment claims DiT's 0; we use 0 (pass
    # --weight-decay 0.01 to match the run). No warm-up, no gradient clipping (0 = off), EMA 0.9999,
    # label dropout 0.1, as official.
    train_defaults = dict(lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, warmup=0,
                          grad_clip=0.0, label_dropout=0.1, ema=0.9999)

    def __init__(self, input_size=32, patch_size=1, in_channels=4, hidden_size=320, num_heads=16,
                 depths=(2, 2, 2, 2), bottleneck_depth=2, window_size=8, num_classes=1000,
                 d_state=16, mlp_ratio=4.0, d_conv=3, conv_bias=False):
        super().__init__()
        if len(depths) != 4:
            raise ValueError(f"LaMamba-Diff has 4 encoder stages, got depths={depths}")
        self.input_size, self.patch_size = input_size, patch_size
        self.in_channels, self.out_channels = in_channels, 2 * in_channels
        self.num_classes, self.window_size = num_classes, window_size
        C = hidden_size
        dims = [C, 2 * C, 4 * C, 4 * C]
        heads = list(num_heads) if isinstance(num_heads, (list, tuple)) else [num_heads] * 4
        cond_dim = dims[-1]
        grid = input_size // patch_size

        self.patch_embed = PatchEmbed(in_channels, C, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, C))  # learned, sin-cos initialised
        self.t_embedder = TimestepEmbedder(cond_dim)
        self.y_embedder = LabelEmbedder(num_classes, cond_dim)

        block = dict(cond_dim=cond_dim, window_size=window_size, d_state=d_state,
                     mlp_ratio=mlp_ratio, d_conv=d_conv, conv_bias=conv_bias)
        # encoder: patch merging after the first two stages only (32 -> 16 -> 8 -> 8 at 256 px)
        self.encoder = nn.ModuleList([
            Stage(depths[i], dims[i], PatchMerging(dims[i], dims[i + 1]) if i < 2 else None,
                  num_heads=heads[i], project_condition=dims[i] != cond_dim,
                  **block) for i in range(4)])
        self.bottleneck = Stage(bottleneck_depth, dims[-1], num_heads=heads[-1],
                                project_condition=False, **block)
        # decoder: mirrored, one block deeper per stage; patch expanding before the last two stages;
        # every decoder block projects the condition (official full_condition_project=True)
        self.decoder = nn.ModuleList([
            Stage(depths[3 - i] + 1, dims[3 - i], PatchExpanding(dims[4 - i]) if i >= 2 else None,
                  num_heads=heads[3 - i], project_condition=True, **block) for i in range(4)])

        self.final_up = PatchExpanding(C, scale=patch_size, out_dim=C)
        self.final_condition_projection = nn.Linear(cond_dim, C)
        self.final_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))
        self.norm_final = ModulatedNorm(C, eps=1e-6)
        self.final_linear = nn.Linear(C, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        # xavier on every Linear (SS2D projections, attention, MLP, merges, condition projections)
        # with zero bias; SS2D's dt/A/D, x_proj, depthwise conv and the relative position tables
        # keep their own init
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # stem conv initialised like a Linear
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1],
                                                     *self.pos_embed.shape[1:3]))
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity
        for module in self.modules():
            if isinstance(module, LaMambaBlock):
                nn.init.zeros_(module.adaLN_modulation[-1].weight)
                nn.init.zeros_(module.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_adaLN_modulation[-1].bias)
        # final_linear keeps its xavier init: the official model does not zero it (DiT does)

    def position_embedding(self, h, w):
        """The learned (1, h, w, C) embedding, resized bilinearly when the grid differs from the one
        built for."""
        pos = self.pos_embed
        if pos.shape[1:3] == (h, w):
            return pos
        pos = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=(h, w), mode="bilinear",
                            align_corners=False)
        return pos.permute(0, 2, 3, 1).to(self.pos_embed.dtype)

    def forward(self, x, t, y=None):
        """x: (N, C, H, W), H and W multiples of 4 * patch_size; t: (N,) DDPM index; y: (N,) labels
        or None."""
        N, C, H, W = x.shape
        step = 4 * self.patch_size  # two 2x merges below the patch grid
        if C != self.in_channels or H % step or W % step:
            raise ValueError(f"LaMamba-Diff expects (N, {self.in_channels}, H, W) with H, W "
                             f"multiples of {step} "
                             f"(patch size x two 2x downsamplings), got {tuple(x.shape)}")
        if y is None:
            y = torch.full((N,), self.num_classes, dtype=torch.long, device=x.device)
        t = t.expand(N) if t.dim() == 0 else t
        c = self.t_embedder(t) + self.y_embedder(y)                                   # (N, 4C)

        # (N, h, w, C) channels-last
        p = self.patch_size
        x = self.patch_embed(x, self.position_embedding(H // p, W // p))
        skips = []
        for stage in self.encoder:
            x = stage(x, c)
            skips.append(x)
            if stage.resample is not None:
                x = stage.resample(x)
        x = x + self.bottleneck(x, c)  # the official outer residual around the bottleneck
        for stage in self.decoder:
            if stage.resample is not None:
                x = stage.resample(x)
            x = stage(x + skips.pop(), c)  # additive long skip from the mirrored encoder stage

        shift, scale = self.final_adaLN_modulation(
            self.final_condition_projection(c))[:, None, None].chunk(2, dim=-1)
        x = self.norm_final(self.final_up(x), shift, scale)
        return self.final_linear(x).permute(0, 3, 1, 2)                              # (N, 2C, H, W)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def sincos_1d(dim, pos):
    """(M,) positions -> (M, dim): [sin(pos * w_i), cos(pos * w_i)], w_i = 10000^(-i / (dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.double()[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim, h, w):
    """MAE's 2-D sin-cos table as (1, h, w, dim): the first half of the channels encodes the column,
    the second half the row."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))],
                    dim=1)
    return emb.float().view(1, h, w, dim)


#################################################################################
#                         Cost and official checkpoints                         #
#################################################################################

def flops(model, input_size=None, batch_size=1):
    """Forward cost in the official repo's convention (LaMambaDiff.flops: fvcore), in G: one
    multiply-add counts as one "FLOP" (so these are GMACs); linears, convolutions and the attention
    matmuls by their MACs; LayerNorms 5 per element (4 without affine); each grouped selective scan
    9 * B * L * D * N + B * D * L (VMamba's flops_selective_scan_fn; ssm.count_scan_flops).
    Elementwise ops are free. Works on the meta device: build the model under `with
    torch.device("meta")` for an instant count."""
    from torch.utils.flop_counter import FlopCounterMode
    input_size = input_size or model.input_size
    device = next(model.parameters()).device
    norms = [0]

    def count_norm(module, inputs, output):
        norms[0] += inputs[0].numel() * (5 if module.elementwise_affine else 4)

    hooks = [m.register_forward_hook(count_norm) for m in model.modules()
             if isinstance(m, nn.LayerNorm)]
    x = torch.zeros(batch_size, model.in_channels, input_size, input_size, device=device)
    t = torch.zeros(batch_size, dtype=torch.long, device=device)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter, count_scan_flops() as scans:
            model(x, t, t)
    finally:
        for hook in hooks:
            hook.remove()
    # torch counts a multiply-add as 2
    return (counter.get_total_flops() / 2 + norms[0] + scans.macs) / 1e9


BLOCK_RENAMES = {"op": "ss2d", "norm": "norm_ssm", "norm_swin": "norm_attn", "norm2": "norm_mlp"}


def official_to_project(key):
    """Official LaMambaDiff parameter name -> this module's name."""
    key = re.sub(r"^layers\.(\d+)\.downsample\.", r"encoder.\1.resample.", key)
    key = re.sub(r"^layers_up\.(\d+)\.upsample\.", r"decoder.\1.resample.", key)
    key = re.sub(r"^layers\.", "encoder.", key)
    key = re.sub(r"^layers_up\.", "decoder.", key)
    key = re.sub(r"^mid_layer\.", "bottleneck.", key)
    return re.sub(r"(blocks\.\d+\.)(op|norm|norm_swin|norm2)\.",
                  lambda m: m[1] + BLOCK_RENAMES[m[2]] + ".", key)


# official buffers that this module derives from the grid instead of storing
DERIVED_BUFFERS = ("attn_mask", "relative_position_index")


def load_official_state_dict(model, state_dict):
    """Load an official LaMambaDiff state dict (e.g. the 'ema' entry of a train.py checkpoint) into
    `model`. Returns (loaded, missing, unused): project keys loaded, project keys with no official
    tensor, official keys with no counterpart. The official attention masks and index buffers are
    recomputed here, so they are skipped. A relative position table built for a map smaller than the
    window ((2r-1)^2 rows) becomes the central part of ours; a position embedding for another grid
    is resized."""
    state_dict = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k,
                  v in state_dict.items()}
    ours = model.state_dict()
    converted, unused = {}, []
    for key, value in state_dict.items():
        if key.split(".")[-1] in DERIVED_BUFFERS:
            continue
        name = official_to_project(key)
        if name not in ours:
            unused.append(key)
            continue
        target = ours[name]
        if name.endswith("relative_position_bias_table") and value.shape != target.shape:
            r, ws = (math.isqrt(value.shape[0]) + 1) // 2, (math.isqrt(target.shape[0]) + 1) // 2
            if r > ws:
                raise ValueError(f"{key}: official window {r} is larger than this model's window "
                                 f"{ws}")
            table = torch.zeros_like(target).view(2 * ws - 1, 2 * ws - 1, -1)
            lo = ws - r
            table[lo:lo + 2 * r - 1, lo:lo + 2 * r - 1] = value.view(2 * r - 1, 2 * r - 1, -1)
            value = table.view_as(target)
        elif name == "pos_embed" and value.shape != target.shape:
            value = F.interpolate(value.permute(0, 3, 1, 2).float(), size=target.shape[1:3],
                                  mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
        if value.shape != target.shape:
            raise ValueError(f"official tensor {key} has shape {tuple(value.shape)}, this model "
                             "expects "
                             f"{tuple(target.shape)} for {name}: was the checkpoint built with "
                             "another config?")
        converted[name] = value
    missing = sorted(set(ours) - set(converted))
    model.load_state_dict(converted, strict=False)
    return sorted(converted), missing, unused


#################################################################################
#                              LaMamba-Diff configs                             #
#################################################################################
# Only XL is released (C = 320, 16 heads). The paper's S/B/L widths are not in the repo: ours are
# the project's own choice, matched in parameters to DiT-S/B/L (33M / 130M / 458M), which the
# abstract says LaMamba-Diff equals or undercuts, with head dims near XL's. All use window 8 and
# d_state 16 (pass d_state=1 for the yaml).

def LaMamba_XL(**kwargs):
    return LaMambaDiff(hidden_size=320, num_heads=16, **kwargs)

def LaMamba_L(**kwargs):
    return LaMambaDiff(hidden_size=256, num_heads=16, **kwargs)

def LaMamba_B(**kwargs):
    return LaMambaDiff(hidden_size=144, num_heads=8, **kwargs)

def LaMamba_S(**kwargs):
    return LaMambaDiff(hidden_size=72, num_heads=4, **kwargs)

def LaMamba_T(**kwargs):
    """Tiny config for tests and CPU runs (the width of the official fidelity vector)."""
    return LaMambaDiff(hidden_size=16, num_heads=4, **kwargs)


LaMamba_models = {"LaMamba-XL": LaMamba_XL, "LaMamba-L": LaMamba_L, "LaMamba-B": LaMamba_B,
                  "LaMamba-S": LaMamba_S, "LaMamba-T": LaMamba_T}
