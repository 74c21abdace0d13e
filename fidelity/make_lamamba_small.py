"""
How fidelity/lamamba_small was made: the official LaMamba-Diff code run on the CPU, its selective scan replaced by
mamba-ssm's sequential reference loop. Not part of the tests; kept so that the vector can be remade.

    pip install timm einops fvcore yacs
    git clone https://github.com/yunxiangfu2001/LaMamba-Diff && git -C LaMamba-Diff checkout 27b3c1d
    git clone https://github.com/state-spaces/mamba && git -C mamba checkout v2.3.2.post1
    python fidelity/make_lamamba_small.py LaMamba-Diff mamba fidelity/lamamba_small
"""
import argparse
import json
import os
import struct
import sys

import torch

OFFICIAL, MAMBA, OUT = sys.argv[1:4]
sys.path[:0] = [OFFICIAL, os.path.join(OFFICIAL, "model")]
# selective_scan_ref, verbatim from mamba_ssm/ops/selective_scan_interface.py (the module itself needs the CUDA
# extension to import, the function does not)
src = open(os.path.join(MAMBA, "mamba_ssm", "ops", "selective_scan_interface.py")).read()
start = src.index("def selective_scan_ref(")
scope = {}
exec("import torch\nimport torch.nn.functional as F\nfrom einops import rearrange, repeat\n"
     + src[start:src.index("\nclass ", start)], scope)
selective_scan_ref = scope["selective_scan_ref"]
import model.vmamba as vmamba  # noqa: E402
import model.lamamba as off


class RefScan:  # stands in for SelectiveScanCore (forward type v2): same call, mamba-ssm's reference loop
    @staticmethod
    def apply(u, delta, A, B, C, D, delta_bias, delta_softplus, *rest):
        return selective_scan_ref(u, delta, A, B, C, D, None, delta_bias, delta_softplus)


vmamba.SelectiveScanCore = off.SelectiveScanCore = RefScan
from config import get_config

EMBED, WINDOW, HEADS, CLASSES, IMAGE = 16, 4, 4, 10, 128
args = argparse.Namespace(cfg=os.path.join(OFFICIAL, "configs", "LaMamba-DIff-XL.yaml"),
                          opts=["MODEL.VSSM.EMBED_DIM", str(EMBED), "MODEL.VSSM.WINDOW_SIZE", str(WINDOW)],
                          num_classes=CLASSES, image_size=IMAGE, num_heads=[HEADS] * 4, unconditional=False)
for name in ("batch_size", "data_path", "zip", "cache_mode", "pretrained", "resume", "accumulation_steps",
             "use_checkpoint", "amp_opt_level", "output", "tag", "eval", "throughput", "enable_amp", "fused_window_process",
             "fused_layernorm", "optim", "model_ema", "model_ema_decay", "model_ema_force_cpu", "memory_limit_rate"):
    setattr(args, name, None)
config = get_config(args)
from model import build_vssm_model
torch.manual_seed(0)
model = build_vssm_model(config, args).eval()

# weights: official init (seed 0); every tensor then gets noise of its own scale (its std, or 0.02 where the
# tensor is constant), seed 1234; every delta bias +4 (so the scan's dt matters); stored in float16 (the file
# must stay under 5 MB), and the official model evaluated on exactly the stored (rounded) values.
g = torch.Generator().manual_seed(1234)
sd = model.state_dict()
skip = ("attn_mask", "relative_position_index")
with torch.no_grad():
    for k, v in sd.items():
        if not v.is_floating_point() or k.split(".")[-1] in skip:
            continue
        scale = v.float().std().item() if v.numel() > 1 else 0.0
        scale = scale if scale > 1e-6 else 0.02
        v.add_(scale * torch.randn(v.shape, generator=g))
        if k.endswith("dt_projs_bias"):
            v.add_(4.0)
        v.copy_(v.half().float())
gi = torch.Generator().manual_seed(7)
x = torch.randn(2, 4, IMAGE // 8, IMAGE // 8, generator=gi)
t = torch.tensor([640, 17])
y = torch.tensor([3, CLASSES])  # a class and the null class
with torch.no_grad():
    out = model(x, t, y)
print("output", out.shape, out.abs().max().item())

tensors = {f"model.{k}": (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
tensors.update({"input.x": x, "input.t": t, "input.y": y, "output": out})
DT = {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64", torch.float64: "F64"}
header, blobs, off_ = {}, [], 0
for k, v in tensors.items():
    b = v.contiguous().numpy().tobytes()
    header[k] = {"dtype": DT[v.dtype], "shape": list(v.shape), "data_offsets": [off_, off_ + len(b)]}
    blobs.append(b); off_ += len(b)
h = json.dumps(header).encode(); h += b" " * (-len(h) % 8)
with open(OUT + ".safetensors", "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
vssm = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(config.MODEL.VSSM).items()}
meta = {"repo": "yunxiangfu2001/LaMamba-Diff", "commit": "27b3c1d77cdc2379853540fe9ffc2ac7a3831589",
        "model": "LaMambaDiff (model/lamamba.py) built by model.build_vssm_model from configs/LaMamba-DIff-XL.yaml with "
                 "the overrides in \"config\" (embed dim 16, window 4, d_state 1 as in the released yaml); output has "
                 "8 channels (epsilon and the variance interpolation value).",
        "call": "model(x, t, y)",
        "config": {"image_size": IMAGE, "num_classes": CLASSES, "num_heads": [HEADS] * 4,
                   "yaml": "configs/LaMamba-DIff-XL.yaml", "opts": args.opts, "vssm": vssm},
        "inputs": {"x": [list(x.shape), "torch.float32"], "t": [list(t.shape), "torch.int64"],
                   "y": [list(y.shape), "torch.int64"]},
        "output": [list(out.shape), "torch.float32"],
        "weights": "official initialisation (seed 0), then every tensor perturbed with Gaussian noise of its own "
                   "standard deviation (0.02 for constant tensors; seed 1234), every delta bias raised by 4, and "
                   "every weight rounded to float16 (stored so, to stay under 5 MB); the output is the official "
                   "model's on exactly these rounded weights",
        "precision": "float32 on CPU; the selective scan is mamba-ssm's sequential reference (selective_scan_ref "
                     "of state-spaces/mamba v2.3.2.post1) in place of the CUDA kernel of forward type v2",
        "script": "fidelity/make_lamamba_small.py"}
json.dump(meta, open(OUT + ".json", "w"), indent=1)
