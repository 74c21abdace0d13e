"""
DiM: Diffusion Mamba for Efficient High-Resolution Image Synthesis.
Teng et al., arXiv 2405.14224; official code tyshiwo1/DiM-DiffusionMamba (commit 292b228).

This file builds the network that the official ImageNet configs build (Mamba2DModel with
ada_norm_single, pad tokens, U-ViT skips and no MLP), written as one readable module instead of a
diffusers subclass plus a 900-line index adapter. What the network does, in order:

  1. patchify (Conv2d, stride p) and add a learned positional embedding, resized bilinearly to any grid (Sec. 3.2);
  2. a depthwise 3x3 convolution over the token grid ("local feature enhancement", Sec. 3.3), no residual;
  3. append 3 learnable pad tokens after every row and 3 pad rows below the grid, so every row and
     every column of the scan ends in separators (Sec. 3.2, "padding tokens"), and put
     [time, class, 3 pads] in front (`pad_layout` picks which pad fills each pad cell: see
     pad_layout_ids);
  4. 2K+1 pre-norm Mamba blocks; each scans the padded grid in one of four orders (row, row reversed,
     column, column reversed) following the official per-layer schedule (Sec. 3.2, "multi-directional scans");
     U-ViT long skips join block k and block 2K+1-k (Sec. 3.3); adaLN-single modulates every block;
  5. drop the prefix and the pads, a second depthwise 3x3 convolution, RMSNorm + adaLN, linear, unpatchify.

The output is epsilon (no learned sigma). Timesteps are the discrete DDPM step n in {1..1000} as the
official network receives it (GaussianDiffusion(time_offset=1) in diffusion.py).
`load_official_state_dict` maps the official parameter names onto this module, so released
checkpoints (nnet_ema.pth) load directly.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dit import cached, timestep_embedding
from ssm import Mamba


#################################################################################
#                               Embedding helpers                               #
#################################################################################

class RMSNorm(nn.Module):
    """RMSNorm with a learned scale, computed in fp32 (as mamba-ssm's fused kernel does)."""
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # one fused kernel where torch has it (2.4+) instead of five elementwise passes
        return F.rms_norm(x.float(), x.shape[-1:], self.weight.float(), self.eps).to(x.dtype)


def resize_pos_embed(pos_embed, num_prefix, grid_h, grid_w):
    """Bilinearly resize the grid part of a (1, num_prefix + g*g, D) embedding to (grid_h, grid_w).
    The prefix entries (time and class tokens) are kept as they are (official
    pos_embed_inteplot)."""
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    g = int(math.isqrt(grid.shape[1]))
    if (g, g) == (grid_h, grid_w):
        return pos_embed
    grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(grid_h, grid_w), mode="bilinear", align_corners=False)
    grid = grid.to(pos_embed.dtype).flatten(2).transpose(1, 2)
    return torch.cat([prefix, grid], dim=1)


#################################################################################
#                          Scan orders over the padded grid                     #
#################################################################################

ROW, ROW_REVERSED, COLUMN, COLUMN_REVERSED = 0, 1, 2, 3


def scan_schedule(depth):
    """Scan order of each layer as the official index logic produces it (adapter, SequenceIndexSet).
    Layer 0 and the encoder layers 1..K step forward through (row, row reversed, column, column
    reversed); the decoder layers K+1..2K step backward, so layer K+k scans in the order of layer
    K-k and every long skip arrives in the order of the stream it joins. The last layer is
    row-major, needed to unpad."""
    K = (depth - 1) // 2
    return [layer % 4 if layer <= K else (2 * K - layer) % 4 for layer in range(depth)]


# Which of the P pad tokens fills each pad cell of the (h+P) x (w+P) padded grid. Both layouts use
# the same cells; only the P pad rows under the grid differ.
#   "lateral": pad column k of every row holds pad k, pad row r holds pad r across the full width,
#              corners included. What the official 256 configs train with (and the default).
#   "cycled":  pads 0, 1, ..., P-1, 0, 1, ... in row-major order over the pad cells. The official
#              code calls it 'rho_pad' (pad_token_schedules in configs/imagenet512_H_DiM_ft.py and
#              imagenet512_H_DiM_upsample(_3x)_test.py; adapter_attn4mamba.py,
#              adaptive_fill_pad_into_sequence): the 512 fine-tune and the upsampling runs use it,
#              so its weights expect it.
PAD_LAYOUTS = ("lateral", "cycled")


def pad_layout_ids(h, w, pad, layout):
    """(h+pad, w+pad) long tensor: -1 on image cells, else the index of the pad token there."""
    if layout not in PAD_LAYOUTS:
        raise ValueError(f"pad_layout must be one of {PAD_LAYOUTS}, got {layout!r}")
    ids = torch.full((h + pad, w + pad), -1, dtype=torch.long)
    ids[:h, w:] = torch.arange(pad)
    if layout == "lateral":
        ids[h:] = torch.arange(pad)[:, None]
    else:
        # Each of the h image rows ends in exactly pad cells, so the cycle restarts at 0 in every
        # pad column block and the bottom block is one cycle laid row-major from its first cell.
        ids[h:] = (torch.arange(pad * (w + pad)) % pad).view(pad, w + pad)
    return ids


def scan_permutations(h, w, pad, device):
    """For a (h+pad) x (w+pad) padded grid stored row-major, the 4 token orders as index tensors."""
    hp, wp = h + pad, w + pad
    row = torch.arange(hp * wp, device=device)
    column = row.view(hp, wp).t().reshape(-1)
    return [row, row.flip(0), column, column.flip(0)]


#################################################################################
#                                 Core DiM block                                #
#################################################################################

class DiMBlock(nn.Module):
    """Pre-norm Mamba block with adaLN-single modulation and an optional U-ViT skip input; no
    MLP."""
    def __init__(self, dim, d_state, d_conv, has_skip):
        super().__init__()
        # U-ViT fusion: Linear on [stream, skip]. The official code uses two (D, D) linears for D >
        # 512; that is the same map (load_official_state_dict concatenates them).
        self.skip_linear = nn.Linear(2 * dim, dim) if has_skip else None
        self.norm = RMSNorm(dim)
        self.mamba = Mamba(dim, d_state=d_state, d_conv=d_conv, expand=2)
        # adaLN-single (PixArt-alpha): one shared projection of the condition, plus a per-block
        # learned offset.
        self.scale_shift_table = nn.Parameter(torch.randn(3, dim) / dim ** 0.5)

    def forward(self, x, adaln, order, skip=None):
        """x: (N, L, D) residual stream, adaln: (N, 3D), order: (L,) the token this layer's scan
        reads at each step."""
        if skip is not None:  # Linear([x, skip]) as two products: no (N, L, 2D) concatenated copy
            w = self.skip_linear.weight
            x = F.linear(x, w[:, :x.shape[-1]], self.skip_linear.bias) + F.linear(skip.to(x.dtype),
                                                                                  w[:, x.shape[-1]:])
        shift, scale, gate = (self.scale_shift_table[None]
                              + adaln.view(-1, 3, x.shape[-1])).unbind(1)
        h = self.norm(x) * (1 + scale[:, None]) + shift[:, None]
        # Norm, modulation and gate act per token, so only the Mamba's conv and scan follow this
        # layer's order: they read the tokens through it in place (no permuted copy).
        h = self.mamba(h, order=order)                   # (N, L, D)
        # The official block multiplies by (1 + gate), not by gate as adaLN-Zero does.
        return x + (1 + gate[:, None]) * h


#################################################################################
#                                  DiM network                                  #
#################################################################################

class DiM(nn.Module):
    """Diffusion Mamba (Teng et al.) on a latent or pixel grid; model(x, t, y) -> epsilon."""
    schedule = "scaled_linear"      # Stable-Diffusion betas, as the official ImageNet configs train
    time_offset = 1                 # the network sees the DDPM step n in {1..1000}
    objective = "eps"
    train_defaults = dict(lr=2e-4, weight_decay=0.03, betas=(0.99, 0.99), eps=1e-15, warmup=5000,
                          grad_clip=1.0, label_dropout=0.1, ema=0.9999)

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1024, depth=49,
                 num_classes=1000, d_state=16, d_conv=3, num_pads=3, pad_layout="lateral"):
        super().__init__()
        if depth % 2 != 1:
            raise ValueError("DiM depth must be odd (one entry layer plus K encoder and K decoder "
                             f"layers), got {depth}")
        self.input_size, self.patch_size = input_size, patch_size
        self.in_channels = self.out_channels = in_channels
        self.hidden_size, self.depth, self.num_classes, self.num_pads = hidden_size, depth, num_classes, num_pads
        if pad_layout not in PAD_LAYOUTS:
            raise ValueError(f"pad_layout must be one of {PAD_LAYOUTS}, got {pad_layout!r} (DiM's "
                             "official 'rho_pad' is 'cycled')")
        # a constructor argument, so checkpoints (which store the kwargs) carry the layout
        self.pad_layout = pad_layout
        D, grid = hidden_size, input_size // patch_size

        self.patch_embed = nn.Conv2d(in_channels, D, patch_size, stride=patch_size)
        # Conditioning as tokens (Sec. 3.2): raw sinusoid of t and a class embedding; row
        # num_classes is the null class.
        self.class_token_embed = nn.Embedding(num_classes + 1, D)
        # [t, c, grid], zeros as official
        self.pos_embed = nn.Parameter(torch.zeros(1, 2 + grid * grid, D))
        # Conditioning through adaLN-single: its own time MLP and its own class table (the official
        # model has both).
        self.adaln_time_mlp = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.adaln_class_embed = nn.Embedding(num_classes + 1, D)
        self.adaln_proj = nn.Linear(D, 3 * D)
        # Pad tokens: prefix_pads sit between [t, c] and the grid; pad_tokens fill the pad cells of
        # the grid in the order pad_layout gives (pad_layout_ids).
        self.prefix_pads = nn.Parameter(torch.randn(num_pads, D) * 0.02)
        self.pad_tokens = nn.Parameter(torch.randn(num_pads, D) * 0.02)
        self.local_enhance_in = nn.Conv2d(D, D, 3, padding=1, groups=D)
        self.local_enhance_out = nn.Conv2d(D, D, 3, padding=1, groups=D)

        K = (depth - 1) // 2
        self.blocks = nn.ModuleList([DiMBlock(D, d_state, d_conv,
                                              has_skip=i > K) for i in range(depth)])
        self.orders = scan_schedule(depth)

        self.final_norm = RMSNorm(D)
        self.final_adaln = nn.Linear(D, 2 * D)
        self.final_proj = nn.Linear(D, patch_size * patch_size * in_channels)
        self._permutation_cache = {}
        self.initialize_weights()

    def initialize_weights(self):
        # The official init (_init_weights_mamba, init_embedders): zero Linear biases except Mamba's
        # dt bias, embeddings N(0, 0.02), Mamba out_proj kaiming-uniform scaled by 1/sqrt(depth).
        # adaLN and the output layer are NOT zero-initialised (the official zero-init calls are
        # commented out).
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", False):
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        for block in self.blocks:
            nn.init.kaiming_uniform_(block.mamba.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                block.mamba.out_proj.weight /= math.sqrt(self.depth)
        nn.init.normal_(self.adaln_time_mlp[0].weight, std=0.02)
        nn.init.normal_(self.adaln_time_mlp[2].weight, std=0.02)

    def permutations(self, h, w, device):
        """Index tensors (with the 2 + num_pads prefix fixed in front) for the 4 scan orders on an h
        x w grid."""
        prefix = 2 + self.num_pads
        return cached(self._permutation_cache, (h, w, str(device)), lambda: [
            torch.cat([torch.arange(prefix, device=device), perm + prefix]).to(torch.int32)
            for perm in scan_permutations(h, w, self.num_pads, device)])

    def pad_grid(self, x, h, w):
        """(N, h*w, D) -> (N, (h+P)*(w+P), D): P pad columns after each row, P pad rows below
        (row-major), filled as pad_layout_ids(h, w, P, self.pad_layout) says."""
        N, _, D = x.shape
        P = self.num_pads
        pads = self.pad_tokens.to(x.dtype)
        # (N, h, w+P, D): pad column k holds pad k in both layouts
        x = torch.cat([x.view(N, h, w, D), pads[None, None].expand(N, h, P, D)], dim=2)
        if self.pad_layout == "lateral":
            bottom = pads[:, None].expand(P, w + P, D)            # pad row r holds pad r
        else:
            # one cycle over the P (w+P) bottom cells, row-major (see pad_layout_ids); built from
            # repeat and expand rather than an index gather, so the pads' gradient is a plain sum
            bottom = pads.repeat(w + P, 1).view(P, w + P, D)
        # (N, h+P, w+P, D)
        x = torch.cat([x, bottom[None].expand(N, P, w + P, D)], dim=1)
        return x.reshape(N, -1, D)

    def unpatchify(self, x, h, w):
        """(N, h*w, p*p*C) -> (N, C, h*p, w*p)."""
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y=None):
        """x: (N, C, H, W) with H, W multiples of patch_size; t: (N,) step n; y: (N,) labels or None
        (null class)."""
        N, C, H, W = x.shape
        p, D, P = self.patch_size, self.hidden_size, self.num_pads
        if C != self.in_channels or H % p or W % p:
            raise ValueError(f"DiM expects (N, {self.in_channels}, H, W) with H, W multiples of "
                             f"{p}, got {tuple(x.shape)}")
        h, w = H // p, W // p
        if y is None:
            y = torch.full((N,), self.num_classes, dtype=torch.long, device=x.device)
        t = t.expand(N) if t.dim() == 0 else t

        time_token = timestep_embedding(t, D).to(x.dtype)                                 # (N, D)
        class_token = self.class_token_embed(y)                                            # (N, D)
        adaln_cond = self.adaln_time_mlp(timestep_embedding(t, 256).to(x.dtype)) + self.adaln_class_embed(y)
        adaln = self.adaln_proj(F.silu(adaln_cond))                                        # (N, 3D)

        # (N, h*w, D)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([time_token[:, None], class_token[:, None], tokens], dim=1)
        # (N, 2+h*w, D)
        tokens = tokens + resize_pos_embed(self.pos_embed, 2, h, w)
        prefix, grid = tokens[:, :2], tokens[:, 2:]
        grid = self.local_enhance_in(grid.transpose(1, 2).reshape(N, D, h, w)).flatten(2).transpose(1, 2)
        # (N, (h+P)(w+P), D)
        grid = self.pad_grid(grid, h, w)
        x = torch.cat([prefix, self.prefix_pads[None].expand(N, P, D).to(grid.dtype), grid], dim=1)
        x = x.float()   # keep the residual stream in fp32, as the official fused add+norm does

        orders = self.permutations(h, w, x.device)
        K = (self.depth - 1) // 2
        skips = []
        for i, block in enumerate(self.blocks):
            x = block(x, adaln, orders[self.orders[i]], skip=skips.pop() if i > K else None)
            if 1 <= i <= K:
                skips.append(x)

        # drop prefix and pads
        grid = x[:, 2 + P:].view(N, h + P, w + P, D)[:, :h, :w]
        grid = self.local_enhance_out(grid.permute(0, 3, 1, 2).to(tokens.dtype)).flatten(2).transpose(1, 2)
        # The final adaLN reads the token embeddings (time sinusoid + class token), not the
        # adaLN-single ones.
        shift, scale = self.final_adaln(F.silu(time_token + class_token)).chunk(2, dim=1)
        out = self.final_norm(grid) * (1 + scale[:, None]) + shift[:, None]
        # (N, C, H, W)
        return self.unpatchify(self.final_proj(out), h, w)


#################################################################################
#                       Loading the official checkpoints                         #
#################################################################################

def official_to_project(key):
    """Map one official Mamba2DModel parameter name to this module's name (None: no counterpart)."""
    fixed = {
        "pos_embed.proj.weight": "patch_embed.weight", "pos_embed.proj.bias": "patch_embed.bias",
        "additional_embed": "pos_embed", "label_emb.weight": "class_token_embed.weight",
        "adaln_single.emb.timestep_embedder.linear_1.weight": "adaln_time_mlp.0.weight",
        "adaln_single.emb.timestep_embedder.linear_1.bias": "adaln_time_mlp.0.bias",
        "adaln_single.emb.timestep_embedder.linear_2.weight": "adaln_time_mlp.2.weight",
        "adaln_single.emb.timestep_embedder.linear_2.bias": "adaln_time_mlp.2.bias",
        "adaln_single.emb.class_embedder.embedding_table.weight": "adaln_class_embed.weight",
        "adaln_single.linear.weight": "adaln_proj.weight",
        "adaln_single.linear.bias": "adaln_proj.bias",
        "a4m_adapter.pad_token_dec_split": "prefix_pads", "a4m_adapter.pad_token": "pad_tokens",
        "a4m_adapter.first_smoother.weight": "local_enhance_in.weight",
        "a4m_adapter.first_smoother.bias": "local_enhance_in.bias",
        "a4m_adapter.last_smoother.weight": "local_enhance_out.weight",
        "a4m_adapter.last_smoother.bias": "local_enhance_out.bias",
        "norm_out.norm.weight": "final_norm.weight",
        "proj_out_1.weight": "final_adaln.weight", "proj_out_1.bias": "final_adaln.bias",
        "proj_out_2.weight": "final_proj.weight", "proj_out_2.bias": "final_proj.bias",
    }
    if key in fixed:
        return fixed[key]
    parts = key.split(".")
    if parts[0] == "transformer_blocks" and len(parts) >= 3:
        block, rest = parts[1], ".".join(parts[2:])
        if rest.startswith("attn1."):
            return f"blocks.{block}.mamba.{rest[len('attn1.'):]}"
        if rest == "norm1.norm.weight":
            return f"blocks.{block}.norm.weight"
        if rest == "scale_shift_table" or rest.startswith("skip_linear."):
            return f"blocks.{block}.{rest}"
    return None


def load_official_state_dict(model, state_dict):
    """Load an official DiM state dict (e.g. nnet_ema.pth) into `model`. Returns (loaded, missing,
    unused): project keys loaded, project keys with no official tensor, official keys with no
    counterpart."""
    state_dict = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k,
                  v in state_dict.items()}
    ours = model.state_dict()
    converted, unused = {}, []
    for key, value in state_dict.items():
        # Large models fuse skips with two (D, D) linears on stream and skip: stack them into one
        # (D, 2D).
        if key.startswith("transformer_blocks.") and ".skip_linear.0." in key:
            other = state_dict[key.replace(".skip_linear.0.", ".skip_linear.1.")]
            name = official_to_project(key.replace(".skip_linear.0.", ".skip_linear."))
            converted[name] = torch.cat([value, other],
                                        dim=1) if key.endswith("weight") else value + other
            continue
        if ".skip_linear.1." in key:
            continue
        name = official_to_project(key)
        if name is None or name not in ours:
            unused.append(key)
            continue
        if name == "pad_tokens":
            value = value[0].t()                      # (1, D, P) -> (P, D)
        elif name == "prefix_pads":
            value = value[0]                          # (1, P, D) -> (P, D)
        converted[name] = value
    for name, value in converted.items():
        if value.shape != ours[name].shape:
            # a checkpoint trained on another grid: resize as DiM's fine-tuning does
            if name == "pos_embed":
                g = int(math.isqrt(ours[name].shape[1] - 2))
                converted[name] = resize_pos_embed(value, 2, g, g)
            else:
                raise ValueError(f"official tensor for {name} has shape {tuple(value.shape)}, "
                                 f"this model expects {tuple(ours[name].shape)}: was the "
                                 "checkpoint built with another config?")
    missing = sorted(set(ours) - set(converted))
    model.load_state_dict(converted, strict=False)
    return sorted(converted), missing, unused


#################################################################################
#                                   DiM configs                                 #
#################################################################################

def DiM_H_2(**kwargs):
    return DiM(depth=49, hidden_size=1536, patch_size=2, **kwargs)

def DiM_L_2(**kwargs):
    return DiM(depth=49, hidden_size=1024, patch_size=2, **kwargs)

def DiM_S_2(**kwargs):
    return DiM(depth=25, hidden_size=512, patch_size=2, **kwargs)

def DiM_T_2(**kwargs):
    """Tiny config for tests and CPU runs (the size of the official fidelity vectors)."""
    return DiM(depth=5, hidden_size=64, patch_size=2, **kwargs)


DiM_models = {"DiM-H/2": DiM_H_2, "DiM-L/2": DiM_L_2, "DiM-S/2": DiM_S_2, "DiM-T/2": DiM_T_2}
