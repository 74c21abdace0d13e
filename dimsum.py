"""
DiMSUM: Diffusion Mamba - A Scalable and Unified Spatial-Frequency Method for Image Generation.
Phung, Dao, Dao, Phan, Metaxas, Tran, NeurIPS 2024, arXiv 2411.04168; official code
VinAIResearch/DiMSUM (commit 8743e63, dimsum/models_dim.py with the released flags: block type
"combined", RMSNorm with fused add-norm, learnable positional embedding, one shared transformer
every 4 blocks).

The official module is an 87 KB file of a dozen block classes selected by flags; this file writes
the one network that the released checkpoints run. Embedders, final layer and shared transformer are
DiT's (Peebles & Xie 2023). What the network does, in order:

  1. patchify (p = 2) and add a learnable positional embedding initialised to 2-D sin-cos (resized bilinearly
     for grids other than the trained one); condition c = time MLP(sinusoid of continuous t) + class embedding;
  2. `depth` DiMSUM blocks on a Mamba/Vim-style residual stream: residual += hidden (fp32), h = RMSNorm(residual).
     Each block splits h by channel into two halves:
       - a spatial Mamba branch, scanning rows, rows reversed, columns, columns reversed as the layer index cycles;
       - a wavelet Mamba branch: 2-level Haar transform of the token features, laid out on the token grid as the
         official code does, scanned window by window (row-first on even layers, column-first on odd ones);
     each branch is x + gate * Mamba(modulate(x)) with its own adaLN. Cross-attention fuses the two branches
     (spatial queries on wavelet keys/values and vice versa), the result is added to h, then a gated GELU MLP
     with adaLN;
  3. after every 4th block one globally shared DiT block (self-attention + gated MLP, adaLN) acts on the block
     output;
  4. DiT's final layer (LayerNorm, adaLN, linear) and unpatchify.

The output is the flow-matching velocity (SiT's GVP path, t = 1 is data), never a variance.
`load_official_state_dict` loads released checkpoints (official parameter names are kept, except
`proj` -> `fusion`). Deliberately left out: the official "conditional Mamba" projection `cond_proj`,
which has no effect on the output (its kernel only uses the projected tensor as an output buffer;
see load_official_state_dict).
"""
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from dit import DiTBlock, FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder, cached, modulate
from ssm import Mamba


#################################################################################
#                                    Helpers                                    #
#################################################################################

class RMSNorm(nn.Module):
    """RMSNorm with a learned scale, computed in fp32 (as mamba-ssm's fused add+norm kernel
    does)."""
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float() if x.dtype != torch.float64 else x
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True)
                                + self.eps) * self.weight.to(x32.dtype)
        return out.to(x.dtype)


def drop_path(x, p, training):
    """Stochastic depth: drop the whole branch output for a random subset of samples (kept ones
    scaled by 1/(1-p)). p is a 0-dim tensor, and a rate of 0 takes the same path (it keeps every
    sample exactly): each block has its own rate, and as Python floats they would make
    torch.compile build one graph per block instead of one for all."""
    if not training:
        return x
    keep = x.new_empty(x.shape[0], *(1,) * (x.dim() - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


#################################################################################
#                  Haar wavelet transform and the wavelet token layout           #
#################################################################################

# The filters, built once per dtype and device (dit.cached; in a compiled graph, in the graph): made
# from host tensors at every call, they would be a host-to-device copy per block, which a CUDA graph
# cannot hold.
_haar_cache = {}


def haar_filters(dtype, device):
    """The four orthonormal 2x2 Haar filters [LL, LH, HL, HH] as a (4, 1, 2, 2) conv weight (pywt's
    'haar')."""
    def build():
        lo, hi = torch.tensor([1.0, 1.0]), torch.tensor([1.0, -1.0])
        # outer(rows, cols)
        bank = [torch.outer(a, b) / 2 for a, b in ((lo, lo), (hi, lo), (lo, hi), (hi, hi))]
        return torch.stack(bank)[:, None].to(dtype=dtype, device=device)
    return cached(_haar_cache, ("filters", dtype, str(device)), build)


def haar_dwt(x):
    """One level of the 2-D Haar transform. (N, C, H, W) -> (N, 4C, H/2, W/2), bands [LL, LH, HL,
    HH] band-major: the stride-2 correlation with haar_filters() (the official DWT_2D)."""
    N, C, H, W = x.shape
    # (N*C, 4, H/2, W/2)
    out = F.conv2d(x.reshape(N * C, 1, H, W), haar_filters(x.dtype, x.device), stride=2)
    return out.view(N, C, 4, H // 2, W // 2).transpose(1, 2).reshape(N, 4 * C, H // 2, W // 2)


def haar_idwt(x):
    """Exact inverse of haar_dwt: the filters are orthonormal, so the transposed convolution inverts
    it."""
    N, C4, h, w = x.shape
    x = x.view(N, 4, C4 // 4, h, w).transpose(1, 2).reshape(-1, 4, h, w)
    # (N*C, 1, 2h, 2w)
    out = F.conv_transpose2d(x, haar_filters(x.dtype, x.device), stride=2)
    return out.view(N, C4 // 4, 2 * h, 2 * w)


def haar_block_matrix(dtype, device):
    """(16, 16): two levels of haar_dwt on one 4 x 4 block, divided by 4. Column p = 4 row + col
    (pixel), row q = 4 b1 + b2 (level-1 band b1, level-2 band b2, each b = r + 2 c where r / c say
    whether the row / column filter is the high-pass one). haar_dwt twice, as a product per block:
    what wavelet_tokens computes, without 1-channel convolutions over N*C maps (slow on GPUs)."""
    def build():
        f = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2)  # [lo, hi]
        # indices: r1 c1 (level-1 band), r2 c2 (level-2 band), i j (2x2 cell), dr dc (pixel)
        m = torch.einsum("ad,be,ci,gj->bagcidje", f, f, f, f) / 4
        return m.reshape(16, 16).to(dtype=dtype, device=device)
    return cached(_haar_cache, ("block matrix", dtype, str(device)), build)


def wavelet_tokens(x, h, w):
    """Tokens (N, h*w, C) of an h x w grid -> 2-level Haar coefficients in the official token layout
    (N, h*w, C).

    Both levels transform all channels (level 2 also splits the level-1 high bands), giving 16
    subbands of C channels at (h/4, w/4); dividing by 4 = 2^levels makes LL the local mean. The
    subbands are ordered level-1 band major, level-2 band minor, and the 16C channels are laid back
    on the grid as (c, p1, p2), c outermost: the token at (4 i + p1, 4 j + p2) holds channels c * 16
    + 4 p1 + p2 (c = 0..C-1) of coarse location (i, j), a channel-strided slice across all 16
    subbands (not one subband per window as the paper's figure shows).
    """
    N, L, C = x.shape
    # the 16 pixels of each 4 x 4 block: (N, h/4, w/4, 16, C)
    blocks = x.view(N, h // 4, 4, w // 4, 4, C).permute(0, 1, 3, 2, 4, 5).reshape(N, h // 4, w // 4,
                                                                                  16, C)
    y = haar_block_matrix(x.dtype, x.device) @ blocks  # (N, h/4, w/4, 16 subbands, C)
    # the same 16C numbers of a coarse location read as (c, p1, p2); token (i, p1, j, p2) holds C
    return y.view(N, h // 4, w // 4, C, 4, 4).permute(0, 1, 4, 2, 5, 3).reshape(N, L, C)


def wavelet_tokens_inverse(x, h, w):
    """Inverse of wavelet_tokens: (N, h*w, C) coefficients -> (N, h*w, C) tokens (the block matrix
    is 1/4 of an orthonormal one, so its inverse is 16 times its transpose)."""
    N, L, C = x.shape
    # (N, h/4, w/4, 16 subbands, C)
    y = x.view(N, h // 4, 4, w // 4, 4, C).permute(0, 1, 3, 5, 2, 4).reshape(N, h // 4, w // 4, 16, C)
    blocks = (16 * haar_block_matrix(x.dtype, x.device).t()) @ y  # (N, h/4, w/4, 16 pixels, C)
    return blocks.view(N, h // 4, w // 4, 4, 4, C).permute(0, 1, 3, 2, 4, 5).reshape(N, L, C)


#################################################################################
#                                  Scan orders                                  #
#################################################################################

def spatial_orders(h, w, device=None):
    """The spatial branch's 4 token orders on an h x w row-major grid: row, row reversed, column,
    column reversed. Layer i uses order i % 4 (official: reversed when i is odd, transposed when i %
    4 >= 2)."""
    row = torch.arange(h * w, device=device)
    column = row.view(h, w).t().reshape(-1)
    return [row, row.flip(0), column, column.flip(0)]


def window_orders(h, w, device=None):
    """The wavelet branch's 2 window scans (LocalMamba's local_scan): the grid is cut into 4 x 4
    windows of (h/4) x (w/4) tokens (official window side: grid side / 2^levels). Row-first walks
    windows in raster order and each window row by row; column-first walks windows column by column
    and each window column by column. Layer i uses row-first when i is even, column-first when
    odd."""
    # (window row, row, window col, col)
    idx = torch.arange(h * w, device=device).view(4, h // 4, 4, w // 4)
    return [idx.permute(0, 2, 1, 3).reshape(-1), idx.permute(2, 0, 3, 1).reshape(-1)]


#################################################################################
#               Embedding layers for patches, timesteps and labels              #
#################################################################################

#################################################################################
#                     Attention, gated MLP and the fusion layer                 #
#################################################################################

def geglu(a, b):
    return F.gelu(a, approximate="tanh") * b


class GatedMLP(nn.Module):
    """GEGLU MLP: w12 (D -> 2H), GELU(tanh)(a) * b, w3 (H -> D)."""
    def __init__(self, dim, hidden):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        if not torch.is_grad_enabled():
            return self.w3(geglu(a, b))
        # The backward needs a and b anyway (for GELU's and the product's gradients); the product
        # itself, w3's (tokens, H) input, is made again from them there, one elementwise pass,
        # instead of being kept: 8 bytes less a channel and token per block at H = 4 D in bf16
        # (compiled, counted with tools/memory; eager, GELU's output is the one not kept). Same
        # numbers: the recomputation repeats the same operations.
        return self.w3(torch.utils.checkpoint.checkpoint(geglu, a, b, use_reentrant=False))


def split_heads(qkv, num_heads):
    """(N, L, 3 * heads * d) -> q, k, v each (N, heads, L, d)."""
    N, L, _ = qkv.shape
    return qkv.view(N, L, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def merge_heads(x):
    """(N, heads, L, d) -> (N, L, heads * d)."""
    return x.transpose(1, 2).flatten(2)


class Attention(nn.Module):
    """Multi-head self-attention with qkv bias (timm's Attention) via
    scaled_dot_product_attention."""
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        return self.proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class CrossAttentionFusion(nn.Module):
    """Fuses the two branches (each D/2 wide): spatial queries attend to wavelet keys/values and
    wavelet queries to spatial keys/values (full attention over all tokens); the two results are
    concatenated and projected to D."""
    def __init__(self, dim, num_heads=8):
        super().__init__()
        self.num_heads = num_heads
        self.qkv1 = nn.Linear(dim // 2, 3 * (dim // 2))   # spatial branch
        self.qkv2 = nn.Linear(dim // 2, 3 * (dim // 2))   # wavelet branch
        self.proj = nn.Linear(dim, dim)

    def forward(self, x1, x2):
        """x1, x2: (N, L, D/2) -> (N, L, D)."""
        q1, k1, v1 = split_heads(self.qkv1(x1), self.num_heads)
        q2, k2, v2 = split_heads(self.qkv2(x2), self.num_heads)
        x12 = merge_heads(F.scaled_dot_product_attention(q1, k2, v2))  # (N, L, D/2)
        x21 = merge_heads(F.scaled_dot_product_attention(q2, k1, v1))
        # proj of [x12, x21] as two products: no concatenated (N, L, D) copy, which the backward
        # would keep besides the attention outputs it keeps anyway
        w, half = self.proj.weight, x12.shape[-1]
        return F.linear(x12, w[:, :half], self.proj.bias) + F.linear(x21, w[:, half:])


#################################################################################
#                                 DiMSUM blocks                                 #
#################################################################################

class MambaBranch(nn.Module):
    """One branch: x + gate * Mamba(modulate(x)) with the tokens taken in a given order; its own
    adaLN on c. The official branches have no norm of their own (the block's RMSNorm precedes the
    split)."""
    def __init__(self, dim, cond_dim, d_state=16, d_conv=4):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 3 * dim))
        # The official CondMamba also owns cond_proj: Linear(cond_dim, 2 * dim), which never reaches
        # the output.
        self.mixer = Mamba(dim, d_state=d_state, d_conv=d_conv, expand=2)

    def forward(self, x, c, order):
        """x: (N, L, dim), c: (N, cond_dim), order: (L,) the token the scan reads at each step."""
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=1)
        # modulation and gate act per token, so only the Mamba's conv and scan follow the order;
        # they read the tokens through it in place (no permuted copy and back)
        return x + gate[:, None] * self.mixer(modulate(x, shift, scale), order=order)


class DiMSUMBlock(nn.Module):
    """Spatial + wavelet Mamba on the two channel halves, cross-attention fusion, gated MLP
    (DiMBlockCombined)."""
    def __init__(self, dim, d_state=16, d_conv=4, fusion_heads=8, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        # its stochastic-depth rate, a tensor (see drop_path); not saved: it is fixed by the config
        self.register_buffer("drop_rate", torch.tensor(float(drop_path)), persistent=False)
        self.norm = RMSNorm(dim)
        self.spatial_mamba = MambaBranch(dim // 2, dim, d_state, d_conv)
        self.freq_mamba = MambaBranch(dim // 2, dim, d_state, d_conv)
        self.fusion = CrossAttentionFusion(dim, fusion_heads)
        self.norm_2 = RMSNorm(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))
        self.mlp = GatedMLP(dim, int(dim * mlp_ratio))

    def forward(self, hidden, residual, c, spatial_order, window_order, grid):
        """hidden: (N, L, D) previous block output, stochastic depth already applied (by the
        network: see DiMSUM.forward); residual: (N, L, D) fp32 stream or None (first block); c: (N, D);
        grid: (h, w). Returns (output, residual)."""
        # Vim/Mamba "add -> norm": the stream sums every block's input, the block sees its RMSNorm.
        residual = hidden if residual is None else residual + hidden
        residual = residual.float() if residual.dtype != torch.float64 else residual
        # (N, L, D)
        h = self.norm(residual)
        x1, x2 = h.chunk(2, dim=-1)
        x1 = self.spatial_mamba(x1, c, spatial_order)
        x2 = wavelet_tokens_inverse(self.freq_mamba(wavelet_tokens(x2, *grid), c, window_order),
                                    *grid)
        # no gate on the fusion (the paper's alpha is the branch gates)
        out = h + self.fusion(x1, x2)
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=1)
        out = out + gate[:, None] * self.mlp(modulate(self.norm_2(out), shift, scale))
        return out, residual


#################################################################################
#                                 DiMSUM network                                #
#################################################################################

class DiMSUM(nn.Module):
    """DiMSUM (Phung et al.) on a latent grid; model(x, t, y) -> velocity."""
    # SiT's GVP interpolant with velocity prediction, t in [0, 1], t = 1 is data
    objective = "flow"
    schedule = None
    time_offset = 0
    # Official ImageNet recipe: AdamW (default betas), constant lr 1e-4, no weight decay, no
    # warm-up, grad-norm clip 1 (2 for the other datasets), label dropout 0.15, EMA 0.9999 every
    # step.
    train_defaults = dict(lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, warmup=0,
                          grad_clip=1.0, label_dropout=0.15, ema=0.9999)

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1024, depth=16,
                 num_classes=1000,
                 d_state=16, d_conv=4, attn_every=4, attn_heads=16, fusion_heads=8, mlp_ratio=4.0,
                 drop_path=0.1):
        super().__init__()
        if hidden_size % 2 or (hidden_size // 2) % fusion_heads or hidden_size % attn_heads:
            raise ValueError(f"hidden_size {hidden_size} must split into two halves of "
                             f"{fusion_heads} fusion heads "
                             f"and into {attn_heads} attention heads")
        self.input_size, self.patch_size = input_size, patch_size
        self.in_channels = self.out_channels = in_channels
        self.hidden_size, self.depth, self.num_classes, self.attn_every = hidden_size, depth, num_classes, attn_every
        grid = input_size // patch_size

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        # learnable, sin-cos init
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size))
        # Stochastic depth linspace(0, p, depth) shifted by one block as in the official code: block
        # 0 gets 0, block i gets p * (i - 1) / (depth - 1).
        rates = [0.0] + [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([DiMSUMBlock(hidden_size, d_state, d_conv, fusion_heads,
                                                 mlp_ratio, rates[i])
                                     for i in range(depth)])
        # DiT's block with DiMSUM's attention and gated MLP: one instance, reused after every 4th
        self.attn_block = DiTBlock(hidden_size, attn_heads, mlp_ratio, attention=Attention,
                                   mlp=GatedMLP)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self._order_cache = {}
        self.initialize_weights()

    def initialize_weights(self):
        # As the official DiM.initialize_weights + Mamba's _init_weights: PyTorch default init for
        # Linear weights, every Linear bias zeroed except Mamba's dt bias, embeddings N(0, 0.02),
        # zero adaLN of the outer blocks and of the final layer, zero output layer. The branches'
        # and the shared block's adaLN weights keep the default init (only their biases are zeroed).
        grid = int(math.isqrt(self.pos_embed.shape[1]))
        with torch.no_grad():
            self.pos_embed.copy_(get_2d_sincos_pos_embed(self.hidden_size, grid,
                                                         self.pos_embed.device))
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", False):
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            # GPT-2 rule: residual output projections of the Mamba mixers scaled by 1/sqrt(depth)
            for branch in (block.spatial_mamba, block.freq_mamba):
                nn.init.kaiming_uniform_(branch.mixer.out_proj.weight, a=math.sqrt(5))
                with torch.no_grad():
                    branch.mixer.out_proj.weight /= math.sqrt(self.depth)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.linear.weight)

    def orders(self, h, w, device):
        """Index tables (int32): the 4 spatial orders and the 2 wavelet window scans for an h x w
        grid."""
        tables = lambda perms: [p.to(torch.int32) for p in perms]
        return cached(self._order_cache, (h, w, str(device)), lambda: (
            tables(spatial_orders(h, w, device)), tables(window_orders(h, w, device))))

    def unpatchify(self, x, h, w):
        """(N, h*w, p*p*C) -> (N, C, h*p, w*p)."""
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y=None):
        """x: (N, C, H, W), H and W multiples of 4 * patch_size; t: (N,) continuous time in [0, 1];
        y: (N,) labels or None (null class). Returns the velocity (N, C, H, W)."""
        N, C, H, W = x.shape
        p = self.patch_size
        if C != self.in_channels or H % p or W % p:
            raise ValueError(f"DiMSUM expects (N, {self.in_channels}, H, W) with H, W multiples of "
                             "the patch size "
                             f"{p}, got {tuple(x.shape)}")
        h, w = H // p, W // p
        if h % 4 or w % 4:
            raise ValueError(f"DiMSUM's 2-level Haar transform halves the {h} x {w} token grid "
                             "twice, so H and W "
                             f"must be multiples of 4 * patch_size = {4 * p}; got {H} x {W}")
        t = t.expand(N) if t.dim() == 0 else t
        if y is None:
            y = torch.full((N,), self.num_classes, dtype=torch.long, device=x.device)

        # (N, D)
        c = self.t_embedder(t) + self.y_embedder(y)
        # (N, h*w, D)
        x = self.x_embedder(x) + resize_pos_embed(self.pos_embed, h, w)
        spatial, windows = self.orders(h, w, x.device)
        residual = None
        for i, block in enumerate(self.blocks):
            if residual is not None:
                # Stochastic depth on what the block adds to the stream (DiMBlockCombined draws it
                # inside the block). Drawn here, outside the block, so that a checkpointed block
                # (--grad-checkpoint) recomputes without random numbers: its replay would reset the
                # generator, which a CUDA graph's capture does not allow.
                x = drop_path(x, block.drop_rate, self.training)
            x, residual = block(x, residual, c, spatial[i % 4], windows[i % 2], (h, w))
            if (i + 1) % self.attn_every == 0:
                # the shared block acts on the block output, not on the stream
                x = self.attn_block(x, c)
        # The final layer reads the last output; the residual stream is not re-added and there is no
        # final norm.
        # (N, C, H, W)
        return self.unpatchify(self.final_layer(x, c), h, w)


#################################################################################
#                       Loading the official checkpoints                         #
#################################################################################

def load_official_state_dict(model, state_dict):
    """Load an official DiMSUM state dict (the "ema" entry of a released .pt, or the Hugging Face
    safetensors) into `model`. Returns (loaded, missing, unused): project keys loaded, project keys
    with no official tensor, official keys with no counterpart.

    Two groups of official tensors are consumed on purpose and not reported as unused:
      - `*.mixer.cond_proj.{weight,bias}` (2 per block): the "conditional Mamba" projection. The official kernel
        (causal_conv1d_fwd_cond) only uses the projected tensor as its output buffer and overwrites it, backward
        returns no gradient for it, and the non-fused path ignores it; the output does not depend on these tensors
        (33.6M of the 460M parameters of L/2), so this model has no such layer;
      - `*.freq_mamba.dwt.*` / `*.idwt.filters`: the fixed Haar filters, checked against haar_filters().
    """
    if "ema" in state_dict and isinstance(state_dict["ema"], dict):   # a whole training checkpoint
        state_dict = state_dict["ema"]
    state_dict = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k,
                  v in state_dict.items()}
    ours = model.state_dict()
    haar = haar_filters(torch.float32, "cpu")
    converted, unused = {}, []
    for key, value in state_dict.items():
        if ".cond_proj." in key:
            continue
        if ".freq_mamba.dwt." in key or ".freq_mamba.idwt." in key:
            band = {"w_ll": 0, "w_lh": 1, "w_hl": 2, "w_hh": 3}.get(key.rsplit(".", 1)[1])
            expected = haar if band is None else haar[band:band + 1]
            if not torch.allclose(value.float().cpu().reshape(expected.shape), expected, atol=1e-6):
                raise ValueError(f"{key} is not the Haar filter this model hard-codes")
            continue
        name = re.sub(r"^blocks\.(\d+)\.proj\.", r"blocks.\1.fusion.", key)
        if name not in ours:
            unused.append(key)
            continue
        if value.shape != ours[name].shape:
            if name == "pos_embed":   # trained on another grid: resize, as the forward pass does
                g = int(math.isqrt(ours[name].shape[1]))
                value = resize_pos_embed(value, g, g)
            else:
                raise ValueError(f"official tensor {key} has shape {tuple(value.shape)}, this "
                                 "model expects "
                                 f"{tuple(ours[name].shape)}: was the checkpoint built with "
                                 "another config?")
        converted[name] = value
    missing = sorted(set(ours) - set(converted))
    model.load_state_dict(converted, strict=False)
    return sorted(converted), missing, unused


#################################################################################
#                        Sine/cosine positional embedding                        #
#################################################################################

def get_2d_sincos_pos_embed(dim, grid_size, device=None):
    """MAE's 2-D sin-cos table (1, g*g, dim): the first half of the channels encodes the column, the
    second the row; each half is [sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-k / (dim/4))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim // 4))
    pos = torch.arange(grid_size, dtype=torch.float64, device=device)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")
    emb = lambda p: torch.cat([torch.sin(p.reshape(-1, 1) * omega),
                               torch.cos(p.reshape(-1, 1) * omega)], dim=1)
    return torch.cat([emb(cols), emb(rows)], dim=1).float()[None]


def resize_pos_embed(pos_embed, grid_h, grid_w):
    """Bilinearly resize a (1, g*g, D) embedding to (1, grid_h*grid_w, D); unchanged on its own
    grid."""
    g = int(math.isqrt(pos_embed.shape[1]))
    if (g, g) == (grid_h, grid_w):
        return pos_embed
    grid = pos_embed.reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(grid_h, grid_w), mode="bilinear", align_corners=False)
    return grid.to(pos_embed.dtype).flatten(2).transpose(1, 2)


#################################################################################
#                                 DiMSUM configs                                #
#################################################################################

def DiMSUM_XL_2(**kwargs):
    return DiMSUM(depth=24, hidden_size=1152, patch_size=2, **kwargs)

def DiMSUM_L_2(**kwargs):
    """The released size (ImageNet, CelebA-HQ and LSUN Church 256)."""
    return DiMSUM(depth=16, hidden_size=1024, patch_size=2, **kwargs)

def DiMSUM_B_2(**kwargs):
    return DiMSUM(depth=12, hidden_size=768, patch_size=2, **kwargs)

def DiMSUM_S_2(**kwargs):
    """DiT-S's width and depth; for one-GPU runs and the Fashion-MNIST comparison."""
    return DiMSUM(depth=12, hidden_size=384, patch_size=2, **kwargs)

def DiMSUM_T_2(**kwargs):
    """Tiny config for tests and CPU runs (the size of the official fidelity vector)."""
    return DiMSUM(depth=8, hidden_size=64, patch_size=2, **kwargs)


DiMSUM_models = {"DiMSUM-B/2": DiMSUM_B_2, "DiMSUM-L/2": DiMSUM_L_2, "DiMSUM-XL/2": DiMSUM_XL_2,
                 "DiMSUM-S/2": DiMSUM_S_2, "DiMSUM-T/2": DiMSUM_T_2}
