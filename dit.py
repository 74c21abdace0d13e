"""
DiT: Scalable Diffusion Models with Transformers.
Peebles & Xie, ICCV 2023 (arXiv 2212.09748); official code facebookresearch/DiT (models.py).

The transformer baseline the Diffusion Mamba models are compared against, rebuilt without timm:

  1. patchify (Conv2d, stride p) and add a frozen 2-D sin-cos positional embedding, computed for the input grid at
     call time, so the same weights run at any resolution (official DiT stores one for its training grid);
  2. N adaLN-Zero blocks: LayerNorm without affine, modulated by (shift, scale) from the condition, then
     self-attention / MLP, each gated; the condition is the time embedding plus the class embedding;
  3. final adaLN + linear to p*p*2C values per token (epsilon and the learned-range variance), unpatchify.

Parameter names follow the official model, so its checkpoints load with `load_official_state_dict`.
Label dropout for classifier-free guidance lives in train.py (the official model drops labels inside
forward); y = None selects the null class, row `num_classes` of the label table. Attention runs
through torch's scaled_dot_product_attention (flash attention on GPUs under bf16).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x, shift, scale):
    """adaLN: x (N, T, D), shift and scale (N, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def adaln_zero(x, c, modulation, norm1, mixer, norm2, mlp):
    """DiT's adaLN-Zero pair of residual branches (Peebles & Xie 2023, Sec. 3.2): the condition c
    (N, D) gives shift, scale and gate for a token mixer and for the MLP. BiDiM and DiMSUM swap in
    their own mixer or MLP. x: (N, T, D)."""
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = modulation(c).chunk(6, dim=1)
    x = x + gate_a[:, None] * mixer(modulate(norm1(x), shift_a, scale_a))
    return x + gate_m[:, None] * mlp(modulate(norm2(x), shift_m, scale_m))


#################################################################################
#               Embedding layers for timesteps, class labels, patches           #
#################################################################################

def timestep_embedding(t, dim, max_period=10000, dtype=torch.float32):
    """Sinusoidal embedding of (possibly fractional) timesteps, cos half first (DiT's). t: (N,) ->
    (N, dim), computed in `dtype` (float32 as DiT; float64 in a float64 model, for precision
    tests)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype,
                                                           device=t.device) / half)
    args = t[:, None].to(dtype) * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoid of the timestep followed by a two-layer SiLU MLP."""
    def __init__(self, hidden_size, frequency_size=256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        dtype = self.mlp[0].weight.dtype  # the sinusoid in float32, or float64 in a float64 model
        emb = timestep_embedding(t, self.frequency_size,
                                 dtype=torch.promote_types(dtype, torch.float32))
        return self.mlp(emb.to(dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class table with one extra row, the null class used for classifier-free guidance."""
    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y):
        return self.embedding_table(y)                                         # (N, D)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches to tokens in row-major order."""
    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)                         # (N, h*w, D)


#################################################################################
#                                 Core DiT block                                #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""
    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        N, T, D = x.shape
        q, k, v = self.qkv(x).view(N, T, 3, self.num_heads,
                                   D // self.num_heads).permute(2, 0, 3, 1, 4)
        # (N, heads, T, D/heads)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    """Two linears with tanh-approximated GELU in between (as DiT)."""
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: modulated norms, gated attention and MLP
    residuals."""
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, attention=None, mlp=None):
        """attention, mlp: other classes with Attention's and Mlp's signatures (DiMSUM's shared
        block has its own)."""
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = (attention or Attention)(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = (mlp or Mlp)(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        """x: (N, T, D) tokens, c: (N, D) condition."""
        return adaln_zero(x, c, self.adaLN_modulation, self.norm1, self.attn, self.norm2, self.mlp)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear to the p*p*C_out values of each patch."""
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))        # (N, T, p*p*C_out)


#################################################################################
#                                  DiT network                                  #
#################################################################################

class DiT(nn.Module):
    """Diffusion Transformer (Peebles & Xie); model(x, t, y) -> (epsilon, variance interpolation),
    2C channels."""
    objective = "eps"
    schedule = "linear"             # DiT's linear betas, 1e-4 to 0.02 over 1000 steps
    time_offset = 0                 # the network sees the DDPM index 0..999
    # DiT's recipe: AdamW 1e-4, no weight decay, no warm-up, EMA 0.9999, label dropout 0.1, no
    # gradient clipping (grad_clip 0 is off).
    train_defaults = dict(lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, warmup=0,
                          grad_clip=0.0, label_dropout=0.1, ema=0.9999)

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, num_classes=1000, learn_sigma=True):
        super().__init__()
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.hidden_size, self.depth, self.num_heads, self.num_classes = hidden_size, depth, num_heads, num_classes

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads,
                                              mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self._pos_cache = {}
        self.initialize_weights()

    def initialize_weights(self, keep=()):
        """DiT's init; `keep`: modules whose Linears keep their own init (BiDiM's Mamba mixers)."""
        # xavier-uniform for every linear, zero biases
        kept = {id(m) for k in keep for m in k.modules()}
        for module in self.modules():
            if isinstance(module, nn.Linear) and id(module) not in kept:
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # the patch projection is a linear map of the flattened patch: initialise it as one
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, and the output starts at zero
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def pos_embed(self, h, w, device):
        """Frozen (1, h*w, D) sin-cos embedding of an h x w token grid, cached per grid and
        device."""
        return cached(self._pos_cache, (h, w, str(device)),
                      lambda: get_2d_sincos_pos_embed(self.hidden_size, h, w, device)[None])

    def unpatchify(self, x, h, w):
        """(N, h*w, p*p*C_out) -> (N, C_out, h*p, w*p)."""
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y=None):
        """x: (N, C, H, W) with H, W multiples of patch_size; t: (N,) DDPM index; y: (N,) labels or
        None (null)."""
        p = self.patch_size
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"DiT expects (N, {self.in_channels}, H, W) with H, W multiples of "
                             f"{p}, "
                             f"got {tuple(x.shape)}")
        N, h, w = x.shape[0], x.shape[2] // p, x.shape[3] // p
        if y is None:
            y = torch.full((N,), self.num_classes, dtype=torch.long, device=x.device)
        t = t.expand(N) if t.dim() == 0 else t

        # (N, T, D), T = h*w
        x = self.x_embedder(x) + self.pos_embed(h, w, x.device)
        c = self.t_embedder(t) + self.y_embedder(y)                              # (N, D)
        for block in self.blocks:
            x = block(x, c)                                                      # (N, T, D)
        x = self.final_layer(x, c)                                               # (N, T, p*p*C_out)
        return self.unpatchify(x, h, w)                                          # (N, C_out, H, W)


def load_official_state_dict(model, state_dict):
    """Load an official DiT checkpoint (e.g. DiT-XL-2-256x256.pt). Its stored pos_embed is dropped:
    the embedding is recomputed for whatever grid the model sees, and equals the stored one on the
    training grid."""
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items() if k != "pos_embed"}
    model.load_state_dict(state_dict)


#################################################################################
#                   Sine/cosine positional embedding functions                  #
#################################################################################

def cached(cache, key, build):
    """build(), made once per key and kept in the dict `cache`: the index tables and embeddings that
    depend only on the grid and the device. In a graph that torch.compile traces it is built in the
    graph, on the device (a few small kernels, which a CUDA graph replays): looked up there, the
    cache would become part of the graph's guards, and its first fill would make the model's second
    call compile it again."""
    if torch.compiler.is_compiling():
        return build()
    if key not in cache:
        with torch.inference_mode(False):  # a normal tensor even when first built in inference mode
            cache[key] = build()
    return cache[key]


def get_1d_sincos_pos_embed(dim, pos):
    """pos: (M,) positions -> (M, dim): sin of pos * 10000^(-k / (dim/2)) for k < dim/2, then cos of
    the same."""
    omega = 10000.0 ** (-torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2))
    angles = pos.to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def get_2d_sincos_pos_embed(dim, h, w, device=None):
    """(h*w, dim) float32 for a row-major h x w grid, built on `device`. As in DiT (and MAE), the
    first half of the channels encodes the column index and the second half the row index; on a
    square grid this equals DiT's stored table."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a hidden size divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                                indexing="ij")
    emb = torch.cat([get_1d_sincos_pos_embed(dim // 2, cols.reshape(-1)),
                     get_1d_sincos_pos_embed(dim // 2, rows.reshape(-1))], dim=1)
    return emb.float()


#################################################################################
#                                   DiT configs                                 #
#################################################################################

def DiT_XL_2(**kwargs):
    return DiT(depth=28, hidden_size=1152, patch_size=2, num_heads=16, **kwargs)

def DiT_XL_4(**kwargs):
    return DiT(depth=28, hidden_size=1152, patch_size=4, num_heads=16, **kwargs)

def DiT_XL_8(**kwargs):
    return DiT(depth=28, hidden_size=1152, patch_size=8, num_heads=16, **kwargs)

def DiT_L_2(**kwargs):
    return DiT(depth=24, hidden_size=1024, patch_size=2, num_heads=16, **kwargs)

def DiT_L_4(**kwargs):
    return DiT(depth=24, hidden_size=1024, patch_size=4, num_heads=16, **kwargs)

def DiT_B_2(**kwargs):
    return DiT(depth=12, hidden_size=768, patch_size=2, num_heads=12, **kwargs)

def DiT_B_4(**kwargs):
    return DiT(depth=12, hidden_size=768, patch_size=4, num_heads=12, **kwargs)

def DiT_S_2(**kwargs):
    return DiT(depth=12, hidden_size=384, patch_size=2, num_heads=6, **kwargs)

def DiT_S_4(**kwargs):
    return DiT(depth=12, hidden_size=384, patch_size=4, num_heads=6, **kwargs)

def DiT_T_2(**kwargs):
    """Tiny config for tests and CPU runs."""
    return DiT(depth=4, hidden_size=64, patch_size=2, num_heads=4, **kwargs)


DiT_models = {
    "DiT-XL/2": DiT_XL_2, "DiT-XL/4": DiT_XL_4, "DiT-XL/8": DiT_XL_8,
    "DiT-L/2": DiT_L_2, "DiT-L/4": DiT_L_4, "DiT-B/2": DiT_B_2, "DiT-B/4": DiT_B_4,
    "DiT-S/2": DiT_S_2, "DiT-S/4": DiT_S_4, "DiT-T/2": DiT_T_2,
}
