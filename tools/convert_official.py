"""
Official weights -> an ordinary train.py checkpoint, so that sample.py, fid.py and train.py
--init-from take them like any run of this project (one checkpoint path, no model special cases
in the scripts); tools/export.py then makes it a safetensors file or a Hub folder if wanted.

    python -m tools.convert_official nnet_ema.pth --out dim_h2_256.pt             # DiM
    python -m tools.convert_official imnet256_510ep.pt --out dimsum_l2.pt         # DiMSUM (Drive)
    python -m tools.convert_official hf://haopt/dimsum-L2-imagenet256 --out dimsum_l2.pt
    python -m tools.convert_official DiT-XL-2-256x256.pt --out dit_xl2_256.pt     # DiT
    python sample.py --ckpt dim_h2_256.pt --cfg 1.4

Reads a state dict from .pt / .pth / .bin (torch.load, weights only) or .safetensors (parsed, never
unpickled), a Hub-layout folder or a Hub id, taking its "ema" entry if it is a whole training
checkpoint (DiMSUM's released {epoch, ema, args}, LaMamba-Diff, DiT-style runs). The family (DiM,
DiMSUM, LaMamba-Diff, DiT) is recognised from its key names; input channels, patch size, classes,
latent grid, state size, conv width and window size are read from tensor shapes; the registry
config (models.py) is the one whose model takes every tensor through the family's own key mapping
(`load_official_state_dict` in dim.py, dimsum.py, lamamba.py, dit.py). The VAE is the one the
checkpoint records (DiMSUM), else Stable Diffusion's ft-EMA VAE for 4-channel latents. DiM's pad
layout is the one its config trained with ('cycled' for the 512 fine-tune). --model, --res,
--num-classes, --vae and --pad-layout override what is read. It prints what it found, then writes
{model, ema, args, model_name, model_kwargs, objective, step 0}: train.py's checkpoint layout.
"""
import argparse
import math
import os
import sys
import warnings

import torch

import dim
import dimsum
import dit
import lamamba
from diffusion import create_diffusion
from models import (MODELS, ModelError, hub_folder_weights, load_failure, read_safetensors,
                    resolve_model_name, resolve_source)

# Every official release is of ImageNet (or CelebA-HQ, LSUN Church) latents of Stable Diffusion's
# VAE; the ft-EMA and ft-MSE VAEs share the encoder, so the weights fit either decoder
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"


class ConvertError(ValueError):
    """A file that is not an official state dict this tool knows; the message says what is wrong."""


def read_official(path):
    """(flat {key: tensor} state dict, the run's recorded arguments or {}) of an official file;
    prefixes ('module.', '_orig_mod.') removed. A whole training checkpoint gives its "ema" entry.
    DiMSUM's released .pt files are {"epoch", "ema", "args"} with args an argparse.Namespace: that
    one class is allowed to the weights-only unpickler (it only holds attributes, and recording
    it gives the VAE and classes the run used); anything else that is not plain data is refused
    as before."""
    path = resolve_source(path)
    path = hub_folder_weights(path) or path
    if not os.path.isfile(path):
        raise ConvertError(f"{path} not found")
    recorded = {}
    try:
        if str(path).endswith(".safetensors"):
            sd = read_safetensors(path)
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                sd = torch.load(path, map_location="cpu", weights_only=True)
    except ModelError as e:
        raise ConvertError(str(e)) from None
    except Exception as e:
        raise ConvertError(f"{path} is not a readable checkpoint, truncated or corrupt? "
                           f"({load_failure(e)})") from None
    if isinstance(sd, dict) and isinstance(sd.get("ema"), dict):
        args = sd.get("args")
        recorded = vars(args) if isinstance(args, argparse.Namespace) else {}
        if "epoch" in sd:
            recorded = {**recorded, "epoch": sd["epoch"]}
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
    return sd, recorded


def read_state_dict(path):
    """The flat {key: tensor} state dict in a file (see read_official)."""
    return read_official(path)[0]


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
               ("pos_embed", 0), lambda sd: dict(
                   d_state=first(sd, "mixer.A_log").shape[1],
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
            result = module.load_official_state_dict(model, sd) or (list(sd), [], [])
        loaded, missing, unused = result
    except (RuntimeError, ValueError, KeyError, TypeError):
        return None
    return None if missing or unused else (loaded, missing, unused)


def choose_vae(vae, recorded, in_channels):
    """(VAE id or None, where it came from): --vae, else the one the run recorded (DiMSUM's
    --vae ema|mse), else Stable Diffusion's for 4-channel latents; --vae none for pixel space."""
    if vae is not None:
        return (None if vae.lower() == "none" else vae), "--vae"
    if recorded.get("vae") in ("ema", "mse"):
        return f"stabilityai/sd-vae-ft-{recorded['vae']}", "recorded in the checkpoint"
    if in_channels == 4:
        return DEFAULT_VAE, "4-channel latents; --vae to change, --vae none for none"
    return None, None


def dim_pad_layout(pad_layout, trained_size, patch_size):
    """(pad layout for a DiM model, why): --pad-layout, else the one the official config of these
    weights trained with. Only the 512 fine-tune (a 32 x 32 token grid; configs/
    imagenet512_H_DiM_ft.py) uses 'rho_pad', dim.py's 'cycled'; the 256 and CIFAR ones (16 x 16)
    use 'lateral'."""
    if pad_layout is not None:
        return pad_layout, "--pad-layout"
    if trained_size and trained_size // patch_size > 16:
        return "cycled", "as the official 512 fine-tune trained ('rho_pad'); --pad-layout to change"
    return "lateral", "as the official 256 configs trained; --pad-layout to change"


def convert(path, model=None, res=None, num_classes=None, vae=None, pad_layout=None):
    """Official weights at `path` -> (checkpoint dict, report lines)."""
    sd, recorded = read_official(path)
    family, module, kwargs = read_config(sd, path)
    layout_note = None
    if family == "DiM":
        # from the grid the weights were trained on, before --res moves it
        layout, why = dim_pad_layout(pad_layout, kwargs["input_size"],
                                     sd["pos_embed.proj.weight"].shape[-1])
        if layout != "lateral":  # the default stays out of the kwargs, as train.py leaves it
            kwargs["pad_layout"] = layout
        layout_note = f"  pad layout {layout} ({why})"
    elif pad_layout is not None:
        raise ConvertError(f"--pad-layout is for DiM weights only; {path} holds {family} ones")
    vae, vae_source = choose_vae(vae, recorded, kwargs["in_channels"])
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
    args = {"model": name, "res": res, "vae": vae, "data": recorded.get("dataset"),
            "converted_from": str(path)}
    if "epoch" in recorded:
        args["official_epoch"] = recorded["epoch"]
    ckpt = {"model": state, "ema": state, "step": 0, "model_name": name, "model_kwargs": kwargs,
            "objective": create_diffusion(net).objective, "args": args}
    report = [f"{path}: official {family} weights -> {name} ({n_params / 1e6:.2f}M parameters)",
              f"  in_channels {kwargs['in_channels']}, latent grid {kwargs['input_size']} (res "
              f"{res}), {kwargs['num_classes']} classes, "
              + ", ".join(f"{k} {v}" for k, v in kwargs.items()
                          if k not in ("in_channels", "input_size", "num_classes",
                                       "pad_layout")),
              f"  VAE {vae} ({vae_source})" if vae else "  pixel space (no VAE)",
              f"  {len(result[0]) if result else len(state)} tensors mapped from {len(sd)} "
              "official ones"]
    if recorded:
        report.append("  recorded run: " + ", ".join(
            f"{k} {recorded[k]}" for k in ("model", "dataset", "image_size", "num_classes",
                                           "epoch") if k in recorded))
    # what the run recorded against what the tensors say (DiMSUM's scripts and released
    # checkpoints disagree in places)
    if recorded.get("image_size") and vae and recorded["image_size"] != res:
        report.append(f"  note: the run recorded image size {recorded['image_size']}, the tensors "
                      f"give {res}; pass --res to override")
    if layout_note:
        report.append(layout_note)
    return ckpt, report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("weights", help="official state dict (.pt, .pth, .bin, .safetensors), or a "
                                   "Hub repository of one (hf://ORG/NAME)")
    p.add_argument("--out", required=True, help="the train.py-style checkpoint to write")
    p.add_argument("--model", default=None,
                   help="registry config (default: the one the tensors fit)")
    p.add_argument("--res", type=int, default=None,
                   help="image side in pixels (default: from the tensors)")
    p.add_argument("--num-classes", type=int, default=None, help="default: from the class table")
    p.add_argument("--vae", default=None,
                   help="the VAE the weights were trained on, stored for sample.py (default: "
                        "the one the checkpoint records, else " + DEFAULT_VAE + " for 4-channel "
                        "latents; 'none' for pixel space)")
    p.add_argument("--pad-layout", choices=dim.PAD_LAYOUTS, default=None,
                   help="DiM only: which pad token fills each pad cell (default: 'cycled', the "
                        "official 'rho_pad', for the 512 fine-tune; 'lateral' otherwise)")
    args = p.parse_args(argv)
    try:
        ckpt, report = convert(args.weights, args.model, args.res, args.num_classes, args.vae,
                               args.pad_layout)
    except (ConvertError, ModelError) as e:
        sys.exit(f"error: {e}")
    print("\n".join(report))
    torch.save(ckpt, args.out)
    print(f"wrote {args.out}")
    return ckpt


if __name__ == "__main__":
    main()
