"""
Model registry (every model file's config dict in one place) and checkpoint loading for train.py and
sample.py.
"""
import functools
import glob
import json
import math
import os
import re
import struct
import warnings

import torch
import torch.utils.checkpoint

from bidim import BiDiM_models
from dim import DiM_models
from dimsum import DiMSUM_models
from dit import DiT_models
from lamamba import LaMamba_models
from ssm import mark_block_recomputed

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
            mark_block_recomputed(module)  # the block recomputes its scans too
            wrapped.append(name)
    return len(wrapped)


def compile_blocks(model, **options):
    """torch.compile each outermost block (the modules checkpoint_blocks wraps), in place: "regional
    compilation". Identical blocks share one compiled graph, so compiling costs about one block per
    distinct shape (15-20 s on an H200 for DiM-S/2 against ~110 s for the whole model), and the
    elementwise work inside each block is fused. Measured (README, Speed): within 3% of compiling a
    Mamba model whole; DiT gains more from whole-model compilation (23 against 37 ms per step).
    Call it after checkpoint_blocks (as train.py and tools/bench.py do): a checkpointed block is then
    compiled inside its checkpoint. The modules that run between the blocks at full resolution
    (BETWEEN_BLOCKS: stems, resampling, heads) are compiled on their own too, so their norms, casts
    and adds fuse as the blocks' do. options go to torch.compile; returns the number of blocks."""
    # Dynamo keeps one compiled entry under the one Block.forward for each block shape and each value
    # of the int attributes it reads (DiM's scan order, LaMamba's window shift; blocks alike in both
    # share an entry: LaMamba-T's 22 blocks and 7 modules between them take 13 graphs). Past its
    # default limit of 8 entries the remaining blocks would silently run eager.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    # Static shapes (dynamic=False): the blocks of one model can differ in shape (LaMamba's U-Net
    # stages), and Dynamo's automatic dynamic shapes would compile every block after the first of a
    # new shape for symbolic sizes: shape-generic kernels, and much slower tracing (LaMamba-T, 6
    # graphs traced by AOT autograd on a CPU: 174 s against 31 s static). Each shape gets its own.
    options = {"dynamic": False, **options}
    compiled = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Block") and not any(name.startswith(c + ".")
                                                               for c in compiled):
            forward = module.__dict__.get("forward")
            if isinstance(forward, functools.partial) and forward.func is _checkpointed:
                # checkpoint_blocks came first: compile inside the checkpoint, which stays eager and
                # runs the compiled block again in the backward. Compiled around it, Inductor's graph
                # of a DiM-L/2 block kept every activation on a GPU (2048 px: 11.6 GiB after the
                # forward against 11.0 without the option, 3.5 with eager blocks; README, Speed).
                module.forward = functools.partial(_checkpointed,
                                                   torch.compile(forward.args[0], **options))
            else:
                module.compile(**options)
            compiled.append(name)
    for name, module in model.named_modules():
        if type(module).__name__ in BETWEEN_BLOCKS and not any(name.startswith(c + ".")
                                                              for c in compiled):
            module.compile(**options)
    return len(compiled)


# Modules that run between the blocks: a stem, a down- or upsampling, a head. Left eager, each is a
# few full-resolution passes of its own (LaMamba-L at 2048 px: its stem norm in fp32 and position add,
# patch merges and expands, final norm and modulation), which compiling fuses into one or two:
# LaMamba-L's guided sampling step 79.0 against 81.3 ms (H100; docs/speed_history.md, session 23).
BETWEEN_BLOCKS = ("PatchEmbed", "PatchMerging", "PatchExpanding", "FinalLayer", "ModulatedNorm")


def fastest_compile(model):
    """How a model trains fastest on a GPU (README, Speed): "blocks" for a model with Mamba layers
    (whole-model compilation gains under 3% over per-block there and compiles ~5x longer), "model"
    for an attention-only network such as DiT (compiled whole: 19.5 against 34.6 ms per step)."""
    # every selective scan has its A as A_log (Mamba) or A_logs (LaMamba's SS2D)
    has_scan = any(".A_log" in name for name, _ in model.named_parameters())
    return "blocks" if has_scan else "model"


def compile_choice(choice, model, device):
    """--compile as train.py and tools/bench.py read it: "auto" is the model's fastest way on a GPU
    and none on a CPU (Inductor's C++ build costs more there than it gains); other choices as
    given."""
    if choice == "auto":
        return fastest_compile(model) if device.type == "cuda" else "none"
    return choice


def cuda_graph(fn, *args, warmup=3, fallback=False):
    """fn(*args) captured as one CUDA graph ("whole-network capture", torch.cuda.graphs), returned
    as a function that takes new tensors of the same shapes, copies them into the captured inputs
    and replays every kernel fn launched, without running fn's Python again. A Mamba model's step
    is thousands of small kernels, each launched through Python (the scan's custom op, autograd,
    the recomputed region): at small shapes, and for DiM-L/2 even at 1024 px, launching them takes
    longer than running them (README, Speed). Replaying removes that host time.

    fn must not synchronise with the host (no .item(), no data-dependent shapes) and must draw its
    random numbers from torch's CUDA generator (replays draw fresh ones). Non-tensor args are fixed
    at capture. The outputs (and the .grad tensors a backward inside fn creates) are the same
    tensors at every call, overwritten by each replay: clone what you keep, and do not set those
    .grad to None. Warm-up calls run first, on a side stream as capture requires: they compile the
    Triton and torch.compile kernels and run first-call checks, which cannot happen during
    capture. fallback=True: if the capture fails, warn once and return fn itself (eager is always
    correct)."""
    if fallback:
        try:
            return cuda_graph(fn, *args, warmup=warmup)
        except Exception as e:  # noqa: BLE001 (whatever failed, fn itself still works)
            warnings.warn(f"could not capture a CUDA graph ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); running without one "
                          "(--cuda-graph off skips the attempt)")
            return fn
    if not torch.cuda.is_available() or not any(torch.is_tensor(a) and a.is_cuda for a in args):
        raise RuntimeError("CUDA graphs need a CUDA GPU and CUDA inputs: run without --cuda-graph "
                           "on this machine")
    static = [a.clone() if torch.is_tensor(a) else a for a in args]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    # the graph's tensors live in a pool of their own: hand back what the warm-up left cached, or a
    # step near the memory limit would hold its activations twice
    torch.cuda.empty_cache()
    graph = torch.cuda.CUDAGraph()
    # thread_local: the data loader's pin-memory thread may allocate page-locked memory meanwhile
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn(*static)

    def replay(*new):
        for s, a in zip(static, new):
            if torch.is_tensor(s):
                s.copy_(a, non_blocking=True)
        graph.replay()
        return out
    return replay


class GraphedModel:
    """Stands in for a model in sampling: model(x, t, y) replayed as a CUDA graph (cuda_graph), one
    per input signature (shapes, dtypes, labels or none, autocast), captured at its first call. A
    sampler calls the model on same-shaped inputs at every step, so after the first step each call
    is one graph launch instead of the model's Python. Outputs are copied out of the graph (samplers
    keep earlier ones). A signature whose capture fails runs eagerly, with one warning."""

    def __init__(self, model):
        self.model, self.graphs = model, {}

    @torch.no_grad()
    def __call__(self, x, t, y=None):
        key = (x.shape, x.dtype, t.shape, t.dtype, None if y is None else (y.shape, y.dtype),
               torch.is_autocast_enabled(x.device.type))
        if key not in self.graphs:
            self.graphs[key] = cuda_graph(self.model, x, t, y, warmup=2, fallback=True)
        out = self.graphs[key](x, t, y)
        return out if self.graphs[key] is self.model else out.clone()

    def __getattr__(self, name):  # patch_size, num_classes, ...: the model's
        return getattr(self.model, name)


def _checkpointed(forward, *args, **kwargs):
    # preserve_rng_state=False: no block draws random numbers (DiMSUM's stochastic depth is drawn
    # before its blocks; tested), and saving the generators' states is not allowed while a CUDA
    # graph is captured
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False,
                                                 preserve_rng_state=False, **kwargs)
    return forward(*args, **kwargs)


def takes_clips(name):
    """Whether a config builds video models (num_frames=T): its model class declares `video =
    True`."""
    with torch.device("meta"):  # no memory, no init cost: only the class attribute is read
        return getattr(MODELS[resolve_model_name(name)](input_size=8), "video", False)


# -------------------------------------------------------------------------------------------------
# Shareable weights: EMA weights as safetensors plus a JSON of what rebuilds the model, as a file
# pair (NAME.safetensors + NAME.json), a Hugging Face Hub folder or a Hub id (tools/export.py)
# -------------------------------------------------------------------------------------------------

HUB_WEIGHTS, HUB_CONFIG = "model.safetensors", "config.json"
HUB_PREFIX = "hf://"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
EXPORT_FORMAT = "diffusion-mamba-export/1"
# the safetensors dtype names (the format's table without the 8-bit floats)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """{name: tensor} of a .safetensors file: an 8-byte little-endian header length, a JSON header
    (dtype, shape and byte range of each tensor), then the raw little-endian data. Parsed here, not
    unpickled, so nothing in the file can run; every range is checked against the shape and the
    file size, so a truncated or corrupt file is one ModelError."""
    try:
        with open(path, "rb") as f:
            blob = bytearray(f.read())
    except OSError as e:
        raise ModelError(f"cannot read {path} ({e.strerror or type(e).__name__})") from None

    def corrupt(why):
        return ModelError(f"{path} is not a readable safetensors file ({why}); it is damaged or "
                          "truncated: download or export it again")

    if len(blob) < 8:
        raise corrupt(f"{len(blob)} bytes, too short for the header length")
    n = struct.unpack("<Q", blob[:8])[0]
    if 8 + n > len(blob):
        raise corrupt(f"a {n}-byte header in a file of {len(blob)} bytes")
    try:
        header = json.loads(blob[8:8 + n])
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise corrupt(f"the header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    base, data_len, end, tensors = 8 + n, len(blob) - 8 - n, 0, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            start, stop = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"tensor {name!r} has no valid dtype, shape and data_offsets") from None
        size = math.prod(shape) * dtype.itemsize
        if min(shape, default=0) < 0 or start < 0 or stop - start != size:
            raise corrupt(f"tensor {name!r} spans {stop - start} bytes, its shape {shape} of "
                          f"{info['dtype']} needs {size}")
        if stop > data_len:
            raise corrupt(f"tensor {name!r} ends at byte {stop} of the data, past its end "
                          f"({data_len})")
        end = max(end, stop)
        if size == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        elif (base + start) % dtype.itemsize:  # misaligned in the file: copy to aligned memory
            raw = blob[base + start:base + stop]
            tensors[name] = torch.frombuffer(raw, dtype=dtype).reshape(shape)
        else:  # a view of the file's bytes, no copy
            tensors[name] = torch.frombuffer(blob, dtype=dtype, count=size // dtype.itemsize,
                                             offset=base + start).reshape(shape)
    if end != data_len:
        raise corrupt(f"{data_len - end} bytes after the last tensor")
    return tensors


def write_safetensors(path, tensors, metadata=None):
    """Write {name: tensor} as safetensors (see read_safetensors), through a temporary file renamed
    into place. Written directly (the format is a JSON header and raw bytes), so exporting needs no
    extra package; tests/test_export.py reads the result with the safetensors package too."""
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in names:
            raise ModelError(f"tensor {name} has dtype {t.dtype}, which safetensors cannot hold")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the library writes it
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for t in tensors.values():
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
    os.replace(tmp, path)


def export_config_path(weights):
    """The JSON beside an exported weights file: NAME.json, else the Hub layout's config.json."""
    stem = os.path.splitext(weights)[0]
    for candidate in (stem + ".json", os.path.join(os.path.dirname(weights), HUB_CONFIG)):
        if os.path.isfile(candidate):
            return candidate
    raise ModelError(f"{weights} has no {os.path.basename(stem)}.json (nor {HUB_CONFIG}) beside "
                     "it, which names the model and its settings; python -m tools.export writes "
                     "both files")


def load_export(weights):
    """An exported model (safetensors + its JSON) as a checkpoint dict like train.py's, without
    the optimizer and RNG state: sample.py, fid.py and --init-from take it as they take a run."""
    config_path = export_config_path(weights)
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelError(f"{config_path} is not readable JSON ({load_failure(e)})") from None
    wanted = {"model_name": str, "model_kwargs": dict, "args": dict}
    wrong = [k for k, kind in wanted.items()
             if not isinstance(config, dict) or not isinstance(config.get(k), kind)]
    if wrong:
        raise ModelError(f"{config_path} is not the JSON of a model exported by this project "
                         f"(no {', '.join(wrong)}); official weights are converted with "
                         "python -m tools.convert_official")
    tensors = read_safetensors(weights)
    args = {"res": config.get("res"), "vae": config.get("vae"), **config["args"]}
    return {"model": tensors, "ema": tensors, "args": args, "model_name": config["model_name"],
            "model_kwargs": config["model_kwargs"], "step": config.get("step", 0),
            "objective": config.get("objective")}


def resolve_source(path):
    """A local path for what --ckpt names. hf://ORG/NAME (or hf://ORG/NAME@REVISION), or ORG/NAME
    when no local ORG folder exists, is a Hugging Face Hub repository: downloaded (weights, JSON and
    card only) with huggingface_hub, an optional package, into its cache; the snapshot folder is
    returned."""
    path = str(path)
    explicit = path.startswith(HUB_PREFIX)
    repo = path[len(HUB_PREFIX):] if explicit else path
    # a bare ORG/NAME is a local path when it could be one: it exists, its first part is a local
    # folder (a mistyped run, not a Hub id), or it names a weights file
    if not explicit and (os.path.exists(path) or not HUB_ID.fullmatch(path)
                         or os.path.isdir(path.split("/")[0])
                         or path.endswith((".pt", ".pth", ".bin", ".safetensors", ".json"))):
        return path
    if not HUB_ID.fullmatch(repo):
        raise ModelError(f"{path} is not a Hub id: write hf://ORG/NAME or hf://ORG/NAME@REVISION")
    repo_id, _, revision = repo.partition("@")
    # a bare ORG/NAME may also have been meant as a local path: say both
    where = "" if explicit else f"{path} is no local file or folder, and "
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelError(f"{where}loading {repo_id} from the Hugging Face Hub needs "
                         "huggingface_hub: pip install huggingface_hub") from None
    try:
        return snapshot_download(repo_id, revision=revision or None,
                                 allow_patterns=["*.safetensors", "*.json", "*.md"])
    except Exception as e:
        raise ModelError(f"{where}the Hugging Face Hub repository {repo_id} cannot be downloaded "
                         f"({load_failure(e)}); check the id, the network, and for a private "
                         "repository HF_TOKEN or huggingface-cli login") from None


def hub_folder_weights(path):
    """The weights file of a folder laid out as a Hub repository, or None."""
    weights = os.path.join(path, HUB_WEIGHTS)
    return weights if os.path.isdir(path) and os.path.isfile(weights) else None


# checkpoints/latest of a run folder: one line naming its newest checkpoint file (a pointer, not a
# link or a copy, so damage to that file leaves it intact and a resume can fall back)
LATEST = "latest"


def checkpoint_folder(path):
    """The checkpoints/ folder that `path` means (a run folder, its checkpoints/ folder or the
    latest pointer), or None when path is meant as one checkpoint file."""
    if os.path.basename(os.path.normpath(path)) == LATEST and os.path.isfile(path):
        return os.path.dirname(path)
    if not os.path.isdir(path) or hub_folder_weights(path):
        return None
    inner = os.path.join(path, "checkpoints")
    return inner if os.path.isdir(inner) else path


def load_newest_checkpoint(path):
    """(checkpoint dict, its file) for a checkpoint file, a run folder, an exported model
    (NAME.safetensors with NAME.json, or a Hub-layout folder) or a Hub id (resolve_source). For a
    run folder: the file that checkpoints/latest names or, when the pointer or that file is missing
    or damaged, the newest readable numbered checkpoint, saying so."""
    path = resolve_source(path)
    path = hub_folder_weights(path) or path
    folder = checkpoint_folder(path)
    if folder is None:
        return load_checkpoint(path), path
    numbered = sorted(glob.glob(os.path.join(folder, "[0-9]*.pt")), reverse=True)
    candidates, problems = [], []
    pointer = os.path.join(folder, LATEST)
    try:
        with open(pointer) as f:
            name = os.path.basename(f.read().strip())  # a file of this folder, nothing else
        if not name.endswith(".pt"):
            raise ValueError
        candidates.append(os.path.join(folder, name))
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        if numbered:
            problems.append(f"{pointer} is missing or damaged")
    for candidate in candidates + [p for p in numbered if p not in candidates]:
        try:
            ckpt = load_checkpoint(candidate)
        except ModelError as e:
            problems.append(str(e))
            continue
        if problems:
            print(f"note: {problems[0]}; using {candidate}, the newest readable checkpoint")
        return ckpt, candidate
    runs = sorted(glob.glob(os.path.join(folder, "*", "checkpoints")))
    if not numbered and runs:  # a results folder given instead of one of its runs
        raise ModelError(f"{path} holds training runs, not checkpoints: pass one of them, e.g. "
                         f"{os.path.dirname(runs[-1])}")
    raise ModelError(f"no readable checkpoint in {folder}"
                     + (f" ({problems[0]})" if problems else "; the run has not written one yet"))


def load_checkpoint(path):
    """A train.py checkpoint (or an exported .safetensors with its JSON) as a dict; clear errors
    for a missing file or a file of another kind."""
    if not os.path.isfile(path):
        raise ModelError(f"checkpoint {path} not found")
    if str(path).endswith(".safetensors"):
        return load_export(path)
    if os.path.getsize(path) == 0:
        raise ModelError(f"{path} is empty (0 bytes), the trace of a write that never finished; "
                         "use an earlier checkpoint of the run")
    try:
        # weights_only: never run pickled code
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"{path} is not a readable PyTorch checkpoint ({load_failure(e)}); it is "
                         "damaged or truncated, or not a file train.py wrote") from None
    if not (isinstance(ckpt, dict) and {"model", "ema", "args", "model_name",
                                        "model_kwargs"} <= ckpt.keys()):
        raise ModelError(f"{path} is not a checkpoint of this project (expected one written by "
                         "train.py; "
                         "convert official weights with python -m tools.convert_official)")
    return ckpt


def load_failure(e):
    """Why torch.load(weights_only=True) failed, in a few words. Never torch's own advice to load
    with weights_only=False: that would run whatever code the file holds."""
    text = str(e)
    if "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f" such as {found.group(1)}" if found else ""
        return (f"it holds Python objects{what} besides tensors and plain data, left unloaded "
                "because loading them can run code")
    first = (text.strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def check_finite_weights(ckpt, path, parts=("model", "ema")):
    """Refuse a checkpoint whose weights hold NaN or inf (written by a diverged run before train.py
    checked for it): training on from it or sampling from it only spreads the NaNs."""
    for part in parts:
        for key, value in ckpt[part].items():
            if torch.is_tensor(value) and value.is_floating_point() and not value.isfinite().all():
                raise ModelError(f"{path} holds NaN or infinite weights ({part}: {key}), the state "
                                 "of a diverged run; use an earlier checkpoint of the run")


def model_from_checkpoint(ckpt, path, name=None):
    """Rebuild a loaded checkpoint's model from its stored config, with its EMA weights. name: if
    given, the checkpoint must hold that model."""
    if name is not None and resolve_model_name(name) != ckpt["model_name"]:
        raise ModelError(f"{path} holds a {ckpt['model_name']} model, not "
                         f"{resolve_model_name(name)}; "
                         f"drop --model or pass --model {ckpt['model_name']}")
    check_finite_weights(ckpt, path, parts=("ema",))
    try:
        model = build_model(ckpt["model_name"], **ckpt["model_kwargs"])
        model.load_state_dict(ckpt["ema"])
    except (TypeError, ValueError, RuntimeError) as e:
        if isinstance(e, ModelError):
            raise
        # an exported JSON edited by hand, or weights and JSON of two different models
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [repr(e)]
        # torch's first line only says that loading failed; the next one says which keys
        why = lines[min(1, len(lines) - 1)] if lines[0].startswith("Error(s)") else lines[0]
        raise ModelError(f"{path}: the weights do not fit {ckpt['model_name']} with "
                         f"{ckpt['model_kwargs']} ({why[:160]})") from None
    return model


def load_model(path, name=None):
    """The model of a checkpoint file or run folder (its newest readable checkpoint), with its EMA
    weights. Returns (model, ckpt)."""
    ckpt, path = load_newest_checkpoint(path)
    return model_from_checkpoint(ckpt, path, name), ckpt


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
    ckpt, path = load_newest_checkpoint(path)
    check_finite_weights(ckpt, path, parts=("ema",))
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
