"""
A trained model -> the files that travel: its EMA weights as safetensors plus a small JSON that
rebuilds it, and with --hub-folder a folder laid out as a Hugging Face Hub repository.

    python -m tools.export results/000-DiM-S-2               # checkpoints/NNNNNNN.safetensors, .json
    python -m tools.export results/000-DiM-S-2 --out dim_s2  # dim_s2.safetensors + dim_s2.json
    python -m tools.export results/000-DiM-S-2 --hub-folder hub/dim-s2-fmnist --fid 21.4
    huggingface-cli upload ORG/dim-s2-fmnist hub/dim-s2-fmnist .
    python sample.py --ckpt hf://ORG/dim-s2-fmnist          # or dim_s2.safetensors, hub/...

The source is a train.py checkpoint, a run folder (its newest readable checkpoint) or a converted
official checkpoint. The JSON holds the model name and kwargs, objective, noise schedule, VAE,
resolution, classes, step and the training arguments; the weights file holds tensors only (no
optimizer, no RNG, no pickle), a fraction of the training checkpoint. The Hub folder holds
model.safetensors, config.json (the same JSON) and a README.md model card with the training
command, data, steps and the FID when given (--fid; fid.py measures it).
"""
import argparse
import json
import os
import shlex
import sys

import torch

from models import (EXPORT_FORMAT, HUB_CONFIG, HUB_WEIGHTS, ModelError, build_model,
                    check_finite_weights, load_newest_checkpoint, write_safetensors)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# train.py arguments that say where and how a run was executed, not what it learned: left out of
# the model card's command
NOT_RECIPE = {"results_dir", "resume", "num_workers", "data_dir", "log_every", "sample_every",
              "ckpt_every", "keep_last", "compile", "grad_checkpoint", "precision"}


def export_config(ckpt, source, fid=None, fid_note=None):
    """The JSON that goes beside the weights (models.load_export reads it back)."""
    with torch.device("meta"):  # only the class's recipe is read: no memory, no init
        model = build_model(ckpt["model_name"], **ckpt["model_kwargs"])
    args = {k: v for k, v in ckpt["args"].items() if k != "results_dir"}
    kwargs = ckpt["model_kwargs"]
    config = {"format": EXPORT_FORMAT, "model_name": ckpt["model_name"], "model_kwargs": kwargs,
              "objective": ckpt.get("objective") or model.objective,
              "schedule": getattr(model, "schedule", None), "vae": args.get("vae"),
              "res": args.get("res"), "num_classes": kwargs.get("num_classes"),
              "step": ckpt.get("step", 0), "args": args, "exported_from": str(source)}
    if fid is not None:
        config["fid"] = {"value": fid, "note": fid_note}
    return config


def training_command(args):
    """The train.py command line that the stored arguments amount to (None for converted official
    weights, which were trained elsewhere)."""
    if args.get("converted_from"):
        return None
    parts = ["python", "train.py"]
    for key, value in args.items():
        if key in NOT_RECIPE or value is None or value is False:
            continue
        if value is True:
            parts.append(f"--{key.replace('_', '-')}")
        elif isinstance(value, (str, int, float)):
            parts += [f"--{key.replace('_', '-')}", shlex.quote(str(value))]
    return " ".join(parts)


def model_card(config, n_params, repo_hint):
    """README.md of the Hub folder: what the model is, how it was trained, how to sample it."""
    args, kwargs = config["args"], config["model_kwargs"]
    classes = config["num_classes"]
    data = args.get("data") or "(not recorded)"
    command = training_command(args)
    rows = [("model", f"{config['model_name']} ({n_params / 1e6:.1f}M parameters)"),
            ("objective / schedule", f"{config['objective']} / {config['schedule'] or '-'}"),
            ("resolution", f"{config['res']} px" + (f", latents of {config['vae']}"
                                                    if config["vae"] else ", pixel space")),
            ("classes", f"{classes} (class-conditional, null label {classes})" if classes
             else "unconditional"),
            ("data", data), ("training steps", config["step"])]
    if "fid" in config:
        note = config["fid"].get("note")
        rows.append(("FID", f"{config['fid']['value']}" + (f" ({note})" if note else "")))
    lines = ["---", "library_name: pytorch", "tags:", "- diffusion", "- mamba",
             "- image-generation", "---", "",
             f"# {config['model_name']}", "",
             "Exponential-moving-average weights of a diffusion model of the Diffusion Mamba "
             "codebase, as safetensors (`model.safetensors`) with the settings that rebuild it "
             "(`config.json`: model name and arguments, objective, noise schedule, VAE, training "
             "arguments).", "",
             "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
             "## Sampling", "",
             "From the repository root of the codebase (`pip install huggingface_hub` once):", "",
             f"    python sample.py --ckpt hf://{repo_hint} --num-samples 16", ""]
    if command:
        lines += ["## Training", "", "The run's arguments as a command:", "", f"    {command}", ""]
    else:
        lines += ["## Origin", "",
                  f"Official weights converted with `tools/convert_official.py` from "
                  f"`{os.path.basename(args['converted_from'])}`; see the paper's repository for "
                  "the training recipe and its licence.", ""]
    lines += ["## Model arguments", "", "```json", json.dumps(kwargs, indent=1), "```", ""]
    return "\n".join(lines)


def export(source, out=None, hub_folder=None, dtype="float32", fid=None, fid_note=None,
           repo_hint="ORG/NAME"):
    """Write the exported files; returns their paths."""
    ckpt, path = load_newest_checkpoint(source)
    check_finite_weights(ckpt, path, parts=("ema",))
    config = export_config(ckpt, path, fid, fid_note)
    tensors = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v
               for k, v in ckpt["ema"].items()}
    n_params = sum(v.numel() for v in ckpt["ema"].values())
    written = []
    if out is not None or hub_folder is None:
        stem = out.removesuffix(".safetensors") if out else os.path.splitext(path)[0]
        written += write_pair(tensors, config, stem + ".safetensors", stem + ".json")
    if hub_folder is not None:
        os.makedirs(hub_folder, exist_ok=True)
        written += write_pair(tensors, config, os.path.join(hub_folder, HUB_WEIGHTS),
                              os.path.join(hub_folder, HUB_CONFIG))
        card = os.path.join(hub_folder, "README.md")
        with open(card, "w") as f:
            f.write(model_card(config, n_params, repo_hint))
        written.append(card)
    return config, written


def write_pair(tensors, config, weights, config_path):
    # the step in the metadata too, so the weights file alone still says what it is
    write_safetensors(weights, tensors, {"format": EXPORT_FORMAT, "model": config["model_name"],
                                         "step": config["step"]})
    with open(config_path, "w") as f:
        json.dump(config, f, indent=1)
        f.write("\n")
    return [weights, config_path]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="a train.py checkpoint, a run folder, or a converted checkpoint")
    p.add_argument("--out", default=None, help="NAME: writes NAME.safetensors and NAME.json "
                   "(default: beside the checkpoint, same name; not written with --hub-folder "
                   "alone)")
    p.add_argument("--hub-folder", default=None,
                   help="also write DIR as a Hugging Face Hub repository (model.safetensors, "
                        "config.json, README.md)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="of the floating-point weights (bfloat16 halves the file)")
    p.add_argument("--fid", type=float, default=None,
                   help="a measured FID to record (JSON and model card)")
    p.add_argument("--fid-note", default=None,
                   help="how it was measured, e.g. '10k samples, dpm++ 10 steps, vs test set'")
    p.add_argument("--repo-id", default="ORG/NAME",
                   help="the Hub id the card's sampling command names")
    args = p.parse_args(argv)
    try:
        config, written = export(args.ckpt, args.out, args.hub_folder, args.dtype, args.fid,
                                 args.fid_note, args.repo_id)
    except (ModelError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"{config['exported_from']}: {config['model_name']} at step {config['step']} "
          f"({args.dtype}) -> {', '.join(written)}")
    if args.hub_folder:
        print(f"upload with: huggingface-cli upload {args.repo_id} {args.hub_folder} .")
    return written


if __name__ == "__main__":
    main()
