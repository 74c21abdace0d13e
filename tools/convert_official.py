"""
Official weights -> an ordinary train.py checkpoint, so that sample.py and train.py --init-from take
them like any run of this project (one checkpoint path, no model special cases in the scripts).

    python -m tools.convert_official nnet_ema.pth --vae stabilityai/sd-vae-ft-ema --out dim_h2.pt   # DiM
    python -m tools.convert_official DiT-XL-2-256x256.pt --vae stabilityai/sd-vae-ft-ema --out dit.pt
    python sample.py --ckpt dim_h2.pt --cfg 1.4

Reads a state dict from .pt / .pth / .bin (torch.load, weights only) or .safetensors, taking its
"ema" entry if it is a whole training checkpoint (DiMSUM, LaMamba-Diff). The family (DiM, DiMSUM,
LaMamba-Diff, DiT) is recognised from its key names; input channels, patch size, classes, latent
grid, state size, conv width and window size are read from tensor shapes; the registry config
(models.py) is the one whose model takes every tensor through the family's own key mapping
(`load_official_state_dict` in dim.py, dimsum.py, lamamba.py, dit.py). --model, --res and
--num-classes override what is read. It prints what it found, then writes {model, ema, args,
model_name, model_kwargs, objective, step 0}: train.py's checkpoint layout.
"""
import argparse
import json
import math
import struct
import sys
import warnings
from pathlib import Path

import torch

import dim
import dimsum
import dit
import lamamba
from diffusion import create_diffusion
from models import MODELS, ModelError, resolve_model_name


class ConvertError(ValueError):
    """A file that is not an official state dict this tool knows; the message says what is wrong."""


def read_safetensors(path):
    """Minimal safetensors reader (8-byte header length, JSON header, raw little-endian data): no
    extra package."""
    dtypes = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "F16": torch.float16,
              "BF16": torch.bfloat16, "I32": torch.int32}
    blob = Path(path).read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if 8 + n + end > len(blob):
            raise ValueError(f"tensor {name} ends at byte {8 + n + end}, past the end of the file "
                             f"({len(blob)})")
        raw = bytearray(blob[8 + n + start: 8 + n + end])
        out[name] = torch.frombuffer(raw, dtype=dtypes[info["dtype"]]).reshape(info["shape"]).clone()
    return out


def read_state_dict(path):
    """The flat {key: tensor} state dict in a file, prefixes ('module.', '_orig_mod.') removed."""
    try:
        if str(path).endswith(".safetensors"):
            sd = read_safetensors(path)
        else:
            # weights_only: never run pickled code
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConvertError(f"{path} not found")
    except Exception as e:
        raise ConvertError(f"{path} is not a readable checkpoint, truncated or corrupt? "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
    if isinstance(sd, dict) and isinstance(sd.get("ema"), dict):
        sd = sd["ema"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor)
                                                     for v in sd.values()):
        raise ConvertError(f"{path} holds no flat state dict of tensors (nor an 'ema' entry with "
                           "one)")
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}
    # the fidelity vectors' layout: model.<official key>, plus the recorded call (input.*, output)
    if any(k.startswith("model.") for k in sd) and all(k.startswith(("model.", "input."))
                                                       or k == "output"
                                                       for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    return sd


def first(sd, suffix):
    return next((v for k, v in sd.items() if k.endswith(suffix)), None)


def grid_of(pos, extra_tokens=0):
    """Side of the square token grid of a positional table (1, extra + side^2, D) or map (1, side,
    side, D)."""
    if pos is None:
        return None
    if pos.dim() == 4:
        return pos.shape[1]
    side = math.isqrt(pos.shape[1] - extra_tokens)
    return side if side * side == pos.shape[1] - extra_tokens else None


# family -> (a key only its official state dict has, module with load_official_state_dict, patch
# embedding, class table, positional table and its non-grid tokens, architecture arguments read from
# shapes)
FAMILIES = {
    "DiMSUM": (".freq_mamba.", dimsum, "x_embedder.proj.weight",
               "y_embedder.embedding_table.weight",
               ("pos_embed", 0), lambda sd: dict(d_state=first(sd, "mixer.A_log").shape[1],
                                                  d_conv=first(sd, "mixer.conv1d.weight").shape[-1])),
    "LaMamba": (".op.A_logs", lamamba, "patch_embed.proj.weight",
                "y_embedder.embedding_table.weight", ("pos_embed", 0), lambda sd: dict(
                    d_state=first(sd, "op.A_logs").shape[1],
                    d_conv=first(sd, "op.conv2d.weight").shape[-1],
                    window_size=(math.isqrt(first(sd, "relative_position_bias_table").shape[0])
                                 + 1) // 2)),
    "DiM": ("adaln_single.", dim, "pos_embed.proj.weight", "label_emb.weight",
            ("additional_embed", 2), lambda sd: dict(d_state=first(sd, "attn1.A_log").shape[1],
                            d_conv=first(sd, "attn1.conv1d.weight").shape[-1])),
    "DiT": ("x_embedder.proj.weight", dit, "x_embedder.proj.weight",
            "y_embedder.embedding_table.weight",
            ("pos_embed", 0), lambda sd: dict(learn_sigma=sd["final_layer.linear.weight"].shape[0]
                                              == 2 * sd["x_embedder.proj.weight"][0].numel())),
}


def read_config(sd, path):
    """(family, module, kwargs read from the tensors)."""
    family = next((f for f, spec in FAMILIES.items() if any(spec[0] in k for k in sd)), None)
    if family is None:
        raise ConvertError(f"{path}: no key of an official DiM, DiMSUM, LaMamba-Diff or DiT state "
                           "dict "
                           f"(first keys: {', '.join(list(sd)[:3])})")
    _, module, embed_key, label_key, (pos_key, extra), arch = FAMILIES[family]
    if embed_key not in sd or label_key not in sd:
        raise ConvertError(f"{path}: an official {family} state dict without {embed_key} or "
                           f"{label_key}: "
                           "truncated or of another version")
    embed = sd[embed_key]  # (D, C, p, p)
    grid = grid_of(sd.get(pos_key), extra)
    # last row: the null class
    kwargs = dict(in_channels=embed.shape[1], num_classes=sd[label_key].shape[0] - 1,
                  input_size=grid * embed.shape[-1] if grid else None, **arch(sd))
    return family, module, kwargs


def fits(name, module, kwargs, sd):
    """(loaded, missing, unused) of `sd` into config `name` built on the meta device, or None if it
    does not fit."""
    try:
        with torch.device("meta"):
            model = MODELS[name](**kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # copying into meta tensors is a shape check only
            loaded, missing, unused = module.load_official_state_dict(model, sd) or (list(sd), [], [])
    except (RuntimeError, ValueError, KeyError, TypeError):
        return None
    return None if missing or unused else (loaded, missing, unused)


def convert(path, model=None, res=None, num_classes=None, vae=None):
    """Official weights at `path` -> (checkpoint dict, report lines)."""
    sd = read_state_dict(path)
    family, module, kwargs = read_config(sd, path)
    factor = 8 if vae else 1
    if res:
        kwargs["input_size"] = res // factor
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if not kwargs["input_size"]:
        raise ConvertError(f"{path}: the latent grid cannot be read from the tensors; pass --res")
    names = [resolve_model_name(model)] if model else [n for n in MODELS
                                                       if n.startswith(family + "-")]
    name = next((n for n in names if fits(n, module, kwargs, sd)), None)
    if name is None:
        raise ConvertError(f"{path}: no {family} config of the registry takes these tensors with "
                           f"{kwargs} "
                           f"(tried {', '.join(names)}); pass --model, --res or --num-classes, or "
                           "add the config")
    torch.manual_seed(0)
    net = MODELS[name](**kwargs)
    result = module.load_official_state_dict(net, sd)
    state = net.state_dict()
    n_params = sum(p.numel() for p in net.parameters())
    res = kwargs["input_size"] * factor
    ckpt = {"model": state, "ema": state, "step": 0, "model_name": name, "model_kwargs": kwargs,
            "objective": create_diffusion(net).objective,
            "args": {"model": name, "res": res, "vae": vae, "data": None,
                     "converted_from": str(path)}}
    report = [f"{path}: official {family} weights -> {name} ({n_params / 1e6:.2f}M parameters)",
              f"  in_channels {kwargs['in_channels']}, latent grid {kwargs['input_size']} (res "
              f"{res}"
              f"{', VAE ' + vae if vae else ''}), {kwargs['num_classes']} classes, "
              + ", ".join(f"{k} {v}" for k, v in kwargs.items()
                          if k not in ("in_channels", "input_size", "num_classes")),
              f"  {len(result[0]) if result else len(state)} tensors mapped from {len(sd)} "
              "official ones"]
    return ckpt, report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("weights", help="official state dict (.pt, .pth, .bin, .safetensors)")
    p.add_argument("--out", required=True, help="the train.py-style checkpoint to write")
    p.add_argument("--model", default=None,
                   help="registry config (default: the one the tensors fit)")
    p.add_argument("--res", type=int, default=None,
                   help="image side in pixels (default: from the tensors)")
    p.add_argument("--num-classes", type=int, default=None, help="default: from the class table")
    p.add_argument("--vae", default=None,
                   help="the VAE the weights were trained on (stored for sample.py)")
    args = p.parse_args(argv)
    try:
        ckpt, report = convert(args.weights, args.model, args.res, args.num_classes, args.vae)
    except (ConvertError, ModelError) as e:
        sys.exit(f"error: {e}")
    print("\n".join(report))
    torch.save(ckpt, args.out)
    print(f"wrote {args.out}")
    return ckpt


if __name__ == "__main__":
    main()
