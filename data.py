"""
Training data: Fashion-MNIST read from its gzip IDX files, any folder of images, and helpers for Stable Diffusion
VAE latents (encode in train.py, decode in sample.py) and for writing images.

Every dataset returns (image, label) with image a float tensor in [-1, 1], (C, res, res), and no randomness:
random flips and label dropout happen in train.py on the whole batch, from the RNG that checkpoints save, so a
resumed run can skip the batches it has already seen without replaying any augmentation draws.
"""
import gzip
import math
import os
import struct

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DataError(ValueError):
    """A dataset, resolution or VAE that cannot be used; the message says what to change."""


#################################################################################
#                                 Fashion-MNIST                                 #
#################################################################################

def read_idx(path, magic):
    """Read a gzip-compressed IDX file (big-endian header: magic, then one uint32 per dimension) as a uint8 array."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path} is not a readable gzip IDX file ({e}); reinstall dataset-fashion-mnist")
    ndim = magic & 0xFF  # the magic's last byte is the number of dimensions, the one before it the dtype (8 = uint8)
    if len(raw) < 4 + 4 * ndim or struct.unpack(">I", raw[:4])[0] != magic:
        raise DataError(f"{path} is not an IDX file of the expected kind (magic number is not {magic:#010x}); "
                        "the file is corrupt or misnamed")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    body = raw[4 + 4 * ndim:]
    if len(body) != math.prod(shape):
        raise DataError(f"{path} is truncated or corrupt: its header promises shape {shape} "
                        f"({math.prod(shape)} bytes) but it holds {len(body)} bytes")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


class FashionMNIST(Dataset):
    """The 60k Fashion-MNIST training images, padded 28 -> 32 and held in memory as one uint8 tensor."""
    num_classes = 10

    def __init__(self, root=None, res=32, channels=1):
        root = root or FASHION_MNIST_DIR
        images_path = os.path.join(root, "train-images-idx3-ubyte.gz")
        labels_path = os.path.join(root, "train-labels-idx1-ubyte.gz")
        for path in (images_path, labels_path):
            if not os.path.isfile(path):
                raise DataError(f"Fashion-MNIST not found: {path} is missing. Install it with "
                                "`sudo apt-get install dataset-fashion-mnist` or pass --data-dir DIR")
        images, labels = read_idx(images_path, 0x00000803), read_idx(labels_path, 0x00000801)
        if len(images) != len(labels) or labels.max() >= self.num_classes:
            raise DataError(f"{root}: images and labels do not match ({len(images)} images, {len(labels)} labels, "
                            f"largest label {labels.max()})")
        # Pad with black (the background) to 32, a size that patch sizes 2, 4 and 8 and the VAE's 8 all divide.
        x = F.pad(torch.from_numpy(images.copy()), (2, 2, 2, 2)).unsqueeze(1)  # (N, 1, 32, 32) uint8
        if res != 32:  # resize once here rather than per sample; chunks bound the float copy's memory
            x = torch.cat([F.interpolate(c.float(), size=(res, res), mode="bilinear", antialias=True)
                           .round().clamp(0, 255).to(torch.uint8) for c in x.split(10000)])
        self.images, self.labels, self.channels = x, torch.from_numpy(labels.astype(np.int64)), channels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i].float() / 127.5 - 1
        return x.expand(self.channels, -1, -1), self.labels[i]


#################################################################################
#                                 Image folders                                 #
#################################################################################

def center_crop_arr(img, res):
    """ADM's centre crop: halve with a box filter while that stays >= 2*res (cheap anti-aliasing for big
    images), resize bicubically so the short side is res, then crop the centre square."""
    while min(img.size) >= 2 * res:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = res / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - res) // 2, (arr.shape[1] - res) // 2
    return arr[top:top + res, left:left + res]


def list_images(folder):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))


class ImageFolder(Dataset):
    """RGB images from a folder: each subfolder is a class (sorted names); no subfolders means unconditional.

    An unreadable image stops training with an error naming the file (rather than being skipped): a silently
    shrinking dataset would change the data order and make runs hard to compare.
    """

    def __init__(self, root, res):
        if not os.path.isdir(root):
            raise DataError(f"no dataset named {root!r} and no such folder (use 'fashion-mnist' or a folder of images)")
        self.classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
        if self.classes:
            self.samples = [(p, i) for i, c in enumerate(self.classes) for p in list_images(os.path.join(root, c))]
        else:
            self.samples = [(p, 0) for p in list_images(root)]
        if not self.samples:
            raise DataError(f"{root} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
        self.num_classes, self.res = len(self.classes), res

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                arr = center_crop_arr(img.convert("RGB"), self.res)
        except OSError as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
            raise DataError(f"cannot read image {path}: {e}") from None
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1
        return x, label


def build_dataset(name_or_path, res, data_dir=None, channels=1):
    """Returns (dataset, num_classes, channels). 'fashion-mnist' or a folder path; channels only matters for
    Fashion-MNIST (1, or 3 to replicate grey into RGB); image folders are always RGB."""
    if name_or_path == "fashion-mnist":
        return FashionMNIST(data_dir, res, channels), FashionMNIST.num_classes, channels
    dataset = ImageFolder(name_or_path, res)
    return dataset, dataset.num_classes, 3


def check_resolution(res, patch_size, vae_factor=1):
    """The model cuts its input into patch_size tiles, and a VAE first shrinks images by vae_factor."""
    step = vae_factor * patch_size
    if res <= 0 or res % step:
        why = f"patch size {patch_size}" + (f" x VAE downsampling {vae_factor}" if vae_factor > 1 else "")
        raise DataError(f"resolution {res} is not divisible by {step} ({why}); "
                        f"pick e.g. --res {max(1, round(res / step)) * step}")


#################################################################################
#                               Stable Diffusion VAE                            #
#################################################################################

def load_vae(name_or_path, device="cpu"):
    """A frozen diffusers AutoencoderKL from a local folder or a Hugging Face hub id."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise DataError("--vae needs the diffusers package: pip install diffusers") from None
    try:
        vae = AutoencoderKL.from_pretrained(name_or_path)
    except Exception as e:  # diffusers raises OSError, ValueError or hub errors depending on what went wrong
        raise DataError(f"could not load the VAE {name_or_path!r} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        "pass a local folder with config.json and the weights, or a hub id such as "
                        "stabilityai/sd-vae-ft-ema (needs internet access once)") from None
    return vae.to(device).eval().requires_grad_(False)


def vae_factor(vae):
    """How much the VAE shrinks each side (8 for Stable Diffusion's)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def vae_encode(vae, x):
    """Images in [-1, 1] -> latents with roughly unit variance (a posterior sample, as in LDM/DiT/DiM training)."""
    return vae.encode(x).latent_dist.sample() * vae.config.scaling_factor


@torch.no_grad()
def vae_decode(vae, z):
    return vae.decode(z / vae.config.scaling_factor).sample


#################################################################################
#                                 Saving images                                 #
#################################################################################

def to_pil(x):
    """One image in [-1, 1], (C, H, W) with C = 1 or 3 -> PIL image."""
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def save_grid(x, path, nrow=None, pad=2):
    """Tile a batch (N, C, H, W) in [-1, 1] into one PNG, nrow images per row (default: about square)."""
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), -1.0)
    for i in range(n):
        top, left = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
        grid[:, top:top + h, left:left + w] = x[i].float().cpu()
    to_pil(grid).save(path)
