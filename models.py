"""
Model registry (every model file's config dict in one place) and checkpoint loading for train.py and
sample.py.
"""
import functools
import glob
import os

import torch
import torch.utils.checkpoint

from bidim import BiDiM_models
from dim import DiM_models
from dimsum import DiMSUM_models
from dit import DiT_models
from lamamba import LaMamba_models

MODELS = {**DiM_models, **BiDiM_models, **DiMSUM_models, **LaMamba_models, **DiT_models}
# `--model dim` picks the family's usual config: the smallest paper-sized one, which trains on one
# GPU.
FAMILY_DEFAULTS = {"dim": "DiM-S/2", "bidim": "BiDiM-S/2", "dimsum": "DiMSUM-S/2",
                   "lamamba": "LaMamba-S", "dit": "DiT-S/2"}


class ModelError(ValueError):
    """An unknown model name or an unusable checkpoint; the message says what to change."""


def resolve_model_name(name):
    name = FAMILY_DEFAULTS.get(name.lower(), name)
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; choose one of: "
                         f"{', '.join([*FAMILY_DEFAULTS, *MODELS])}")
    return name


def build_model(name, **kwargs):
    """name: a config ('DiM-S/2') or a family ('dim'); kwargs: input_size, in_channels,
    num_classes."""
    return MODELS[resolve_model_name(name)](**kwargs)


def checkpoint_blocks(model):
    """Activation checkpointing per block (train.py --grad-checkpoint): each outermost module whose
    class name ends in "Block" (DiMBlock, BiDiMBlock, DiMSUMBlock, LaMambaBlock, DiTBlock) keeps only
    its inputs and recomputes its activations in the backward: less memory for one more forward of
    every block. Apply it to the trained model only (a deepcopy would call the original's forward)."""
    wrapped = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Block") and not any(name.startswith(w + ".")
                                                               for w in wrapped):
            module.forward = functools.partial(_checkpointed, module.forward)
            wrapped.append(name)
    return len(wrapped)


def _checkpointed(forward, *args, **kwargs):
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def takes_clips(name):
    """Whether a config builds video models (num_frames=T): its model class declares `video =
    True`."""
    with torch.device("meta"):  # no memory, no init cost: only the class attribute is read
        return getattr(MODELS[resolve_model_name(name)](input_size=8), "video", False)


def find_checkpoint(path):
    """A checkpoint file, or a run folder of train.py (then its checkpoints/latest.pt)."""
    return os.path.join(path, "checkpoints", "latest.pt") if os.path.isdir(path) else path


def load_newest_checkpoint(path):
    """(checkpoint dict, its file) for a checkpoint file or a run folder. In a folder: latest.pt, or,
    when it is missing or unreadable, the newest readable numbered checkpoint (saying so)."""
    if not os.path.isdir(path):
        return load_checkpoint(path), path
    folder = os.path.join(path, "checkpoints")
    numbered = sorted(glob.glob(os.path.join(folder, "[0-9]*.pt")), reverse=True)
    problems = []
    for candidate in [os.path.join(folder, "latest.pt"), *numbered]:
        try:
            ckpt = load_checkpoint(candidate)
        except ModelError as e:
            problems.append(str(e))
            continue
        if problems:
            print(f"note: {problems[0]}; using {candidate} instead")
        return ckpt, candidate
    raise ModelError(f"no readable checkpoint in {folder}"
                     + (f" ({problems[0]})" if problems else "; the run has not written one yet"))


def load_checkpoint(path):
    """A train.py checkpoint as a dict; clear errors for a missing file or a file of another
    kind."""
    if not os.path.isfile(path):
        raise ModelError(f"checkpoint {path} not found")
    try:
        # weights_only: never run pickled code
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's first line (not its advice to load with weights_only=False: never do that here)
        first = (str(e).strip().splitlines() or [""])[0]
        detail = "" if (not first or "weights_only" in first) else f": {first}"
        raise ModelError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}{detail}); "
                         "it is damaged or truncated, or not a file train.py wrote")
    if not (isinstance(ckpt, dict) and {"model", "ema", "args", "model_name",
                                        "model_kwargs"} <= ckpt.keys()):
        raise ModelError(f"{path} is not a checkpoint of this project (expected one written by "
                         "train.py; "
                         "convert official weights with python -m tools.convert_official)")
    return ckpt


def load_model(path, name=None):
    """Rebuild a checkpoint's model from its stored config and load its EMA weights. Returns (model,
    ckpt). name: if given, the checkpoint must hold that model."""
    ckpt = load_checkpoint(path)
    if name is not None and resolve_model_name(name) != ckpt["model_name"]:
        raise ModelError(f"{path} holds a {ckpt['model_name']} model, not "
                         f"{resolve_model_name(name)}; "
                         f"drop --model or pass --model {ckpt['model_name']}")
    model = build_model(ckpt["model_name"], **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["ema"])
    return model, ckpt


def resize_grid_tensor(value, new_shape, old_grid, new_grid):
    """Bilinearly resize a learned positional embedding to another token grid (DiM's 256 -> 512
    fine-tune). Handles (1, prefix + h*w, D) tables (the prefix, e.g. DiM's time and class entries,
    is kept) and (1, h, w, D) maps. old_grid/new_grid: (h, w) token grids."""
    if value.dim() == 4:
        grid = value.permute(0, 3, 1, 2)
    else:
        prefix_len = value.shape[1] - old_grid[0] * old_grid[1]
        prefix, grid = value[:, :prefix_len], value[:, prefix_len:].reshape(1, *old_grid, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid.float(), size=new_grid, mode="bilinear",
                                           align_corners=False)
    grid = grid.to(value.dtype).permute(0, 2, 3, 1)
    out = grid if value.dim() == 4 else torch.cat([prefix, grid.reshape(1, -1, grid.shape[-1])],
                                                  dim=1)
    if tuple(out.shape) != tuple(new_shape):
        raise ModelError(f"cannot resize a tensor of shape {tuple(value.shape)} to "
                         f"{tuple(new_shape)}")
    return out


def init_from_checkpoint(model, path, model_name):
    """Weak-to-strong start (DiM Sec. 4): load every weight of a checkpoint trained at a lower
    resolution into `model`, resizing the tensors that depend on the token grid. Uses the
    checkpoint's EMA weights, as DiM's 512 fine-tune starts from the 256 nnet_ema. Returns (copied,
    resized, skipped) key lists."""
    ckpt = load_checkpoint(path)
    if ckpt["model_name"] != model_name:
        raise ModelError(f"--init-from {path} holds a {ckpt['model_name']} model, not "
                         f"{model_name}: "
                         f"pass --model {ckpt['model_name']} or a checkpoint of {model_name}")
    # same config, so the same patch size
    old_side = ckpt["model_kwargs"]["input_size"] // model.patch_size
    new_side = model.input_size // model.patch_size
    ours, copied, resized, skipped = model.state_dict(), [], [], []
    for key, value in ckpt["ema"].items():
        if key not in ours:
            skipped.append(key)
        elif value.shape == ours[key].shape:
            ours[key] = value
            copied.append(key)
        elif "pos_embed" in key:
            ours[key] = resize_grid_tensor(value, ours[key].shape, (old_side, old_side),
                                           (new_side, new_side))
            resized.append(key)
        else:
            skipped.append(key)
    model.load_state_dict(ours)
    return copied, resized, skipped
