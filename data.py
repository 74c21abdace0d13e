"""
Training data: Fashion-MNIST read from its gzip IDX files, any folder of images, and helpers for
Stable Diffusion VAE latents (encode in train.py, decode in sample.py) and for writing images.

Every dataset returns (image, label) with image a float tensor in [-1, 1], (C, res, res), and no
randomness: random flips and label dropout happen in train.py on the whole batch, from the RNG that
checkpoints save, so a resumed run can skip the batches it has already seen without replaying any
augmentation draws.
"""
import functools
import gzip
import math
import os
import struct
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                    ".pgm")


class DataError(ValueError):
    """A dataset, resolution or VAE that cannot be used; the message says what to change."""


#################################################################################
#                                 Fashion-MNIST                                 #
#################################################################################

def read_idx(path, magic):
    """Read a gzip-compressed IDX file (big-endian header: magic, then one uint32 per dimension) as
    a uint8 array."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: a corrupt deflate stream
        raise DataError(f"{path} is not a readable gzip IDX file ({e}); reinstall "
                        "dataset-fashion-mnist")
    # the magic's last byte is the number of dimensions, the one before it the dtype (8 = uint8)
    ndim = magic & 0xFF
    if len(raw) < 4 + 4 * ndim or struct.unpack(">I", raw[:4])[0] != magic:
        raise DataError(f"{path} is not an IDX file of the expected kind (magic number is not "
                        f"{magic:#010x}); "
                        "the file is corrupt or misnamed")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    body = raw[4 + 4 * ndim:]
    if len(body) != math.prod(shape):
        raise DataError(f"{path} is truncated or corrupt: its header promises shape {shape} "
                        f"({math.prod(shape)} bytes) but it holds {len(body)} bytes")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


@functools.lru_cache(maxsize=2)
def load_fashion_mnist(root=None, split="train"):
    """Fashion-MNIST's images (N, 28, 28) and labels (N,) as uint8 arrays, split "train" (60k) or
    "t10k" (10k); cached. The one reader of the IDX files: training, Moving Fashion-MNIST and
    fid.py's reference sets."""
    root = root or FASHION_MNIST_DIR
    paths = [os.path.join(root, f"{split}-{kind}-idx{n}-ubyte.gz") for kind,
             n in (("images", 3), ("labels", 1))]
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"Fashion-MNIST not found: {path} is missing. Install it with "
                            "`sudo apt-get install dataset-fashion-mnist` or pass --data-dir DIR")
    images, labels = read_idx(paths[0], 0x00000803), read_idx(paths[1], 0x00000801)
    if len(images) != len(labels) or labels.max() >= 10:
        raise DataError(f"{root}: images and labels do not match ({len(images)} images, "
                        f"{len(labels)} labels, "
                        f"largest label {labels.max()})")
    return images, labels


class FashionMNIST(Dataset):
    """The 60k Fashion-MNIST training images, padded 28 -> 32 and held in memory as one uint8
    tensor; other resolutions are resized from it."""
    num_classes = 10

    def __init__(self, root=None, res=32, channels=1):
        images, labels = load_fashion_mnist(root)
        # Pad with black (the background) to 32, a size that patch sizes 2, 4 and 8 and the VAE's 8
        # all divide.
        # (N, 1, 32, 32) uint8
        x = F.pad(torch.from_numpy(images.copy()), (2, 2, 2, 2)).unsqueeze(1)
        # smaller: resized once here (less memory than the 32 px set); larger: each item when it
        # is read, because the whole set at 256 px would take 4 GB and minutes to make
        if res < 32:
            x = torch.cat([resize_uint8(c, res) for c in x.split(10000)])  # chunks bound the floats
        self.images, self.labels, self.channels = x, torch.from_numpy(labels.astype(np.int64)), channels
        self.res = res

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices):
        """A batch's items at once (the DataLoader's fetcher calls this when it exists): one resize
        for the whole batch, ~100x faster than one per image."""
        x = self.images[indices]
        if x.shape[-1] != self.res:
            x = resize_uint8(x, self.res)
        x = (x.float() / 127.5 - 1).expand(-1, self.channels, -1, -1)
        return list(zip(x, self.labels[indices]))


def resize_uint8(x, res):
    """uint8 images (N, C, H, W) -> (N, C, res, res) uint8, bilinear with anti-aliasing when
    shrinking."""
    x = F.interpolate(x.float(), size=(res, res), mode="bilinear", antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)


#################################################################################
#                                 Image folders                                 #
#################################################################################

def center_crop_arr(img, res):
    """ADM's centre crop: halve with a box filter while that stays >= 2*res (cheap anti-aliasing for
    big images), resize bicubically so the short side is res, then crop the centre square."""
    while min(img.size) >= 2 * res:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = res / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - res) // 2, (arr.shape[1] - res) // 2
    return arr[top:top + res, left:left + res]


# Transparent pixels are composited on black: the background of Fashion-MNIST and of its padding.
BACKGROUND = (0, 0, 0)


def integer_range(img):
    """The largest value of an integer image's pixel type. Pillow opens 16-bit PNGs and TIFFs as
    I;16, 16-bit PGM/PPM as I scaled to 16 bits, and 32-bit TIFFs as I (BitsPerSample 32)."""
    if img.mode.startswith("I;16"):
        return 65535
    tags = getattr(img, "tag_v2", {})
    bits, sample_format = tags.get(258, 16), tags.get(339, 1)  # BitsPerSample, SampleFormat
    bits = bits[0] if isinstance(bits, tuple) else bits
    signed = (sample_format[0] if isinstance(sample_format, tuple) else sample_format) == 2
    return 2 ** (bits - signed) - 1


def to_rgb(img, path):
    """Any PIL image -> 8-bit RGB. Not Pillow's convert("RGB") alone, which clips 16-bit, 32-bit
    and float pixels instead of scaling them (a 16-bit ramp becomes almost white, a float one
    black) and drops transparency (transparent pixels show whatever colour they store). Integer
    images are scaled from their type's range, float images read as [0, 1] (others refused), and
    transparency is composited on BACKGROUND."""
    if img.mode == "F" or img.mode.startswith("I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if img.mode == "F" else integer_range(img)
        if not (np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= top):
            kind = "float" if img.mode == "F" else f"{img.mode} integer"
            raise DataError(f"{path}: a {kind} image with values in [{arr.min():g}, {arr.max():g}], "
                            f"outside [0, {top:g}]; save it as an 8- or 16-bit image")
        img = Image.fromarray(np.round(arr * (255 / top)).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba)
    return img.convert("RGB")


def read_rgb(path, what="image"):
    """The image file at path as 8-bit RGB (to_rgb); a DataError naming the file if it cannot be
    read."""
    try:
        with Image.open(path) as img:
            return to_rgb(img, path)
    except OSError as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise DataError(f"cannot read {what} {path}: {e}") from None
    except Image.DecompressionBombError as e:  # a header claiming e.g. 20000 x 20000 pixels
        raise DataError(f"cannot read {what} {path}: {e} Remove it (or shrink it, if the image is "
                        "genuine)") from None


def list_images(folder):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))


class ImageFolder(Dataset):
    """RGB images from a folder: each subfolder is a class (sorted names); no subfolders means
    unconditional. Images of any mode are converted by to_rgb (scaled, alpha on black).

    An unreadable image stops training with an error naming the file (rather than being skipped): a
    silently shrinking dataset would change the data order and make runs hard to compare. For the
    same reason an empty class folder (a label without images) and images beside the class folders
    (which would belong to no class) are refused rather than ignored.
    """

    def __init__(self, root, res):
        if not os.path.isdir(root):
            raise DataError(f"no dataset named {root!r} and no such folder (use 'fashion-mnist' or "
                            "a folder of images)")
        self.classes = sorted(d.name for d in os.scandir(root) if d.is_dir()
                              and not d.name.startswith("."))
        if self.classes:
            loose = sorted(f for f in os.listdir(root) if f.lower().endswith(IMAGE_EXTENSIONS)
                           and not f.startswith(".") and os.path.isfile(os.path.join(root, f)))
            if loose:
                raise DataError(f"{root} holds images beside its class folders ({len(loose)}, "
                                f"e.g. {loose[0]}), which would belong to no class; move them into "
                                "a class folder or out of the dataset")
            # ImageNet's 1.28M files take minutes to list on a network disk: a bar if it is slow
            per_class = [list_images(os.path.join(root, c))
                         for c in tqdm(self.classes, desc=f"listing {root}", unit="class",
                                       delay=2, leave=False)]
            empty = [c for c, files in zip(self.classes, per_class) if not files]
            if empty:
                raise DataError(f"class folders of {root} without images: {', '.join(empty[:5])}; "
                                "every subfolder is a label, so add images or remove the folder")
            self.samples = [(p, i) for i, files in enumerate(per_class) for p in files]
        else:
            self.samples = [(p, 0) for p in list_images(root)]
        if not self.samples:
            raise DataError(f"{root} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
        self.num_classes, self.res = len(self.classes), res

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        arr = center_crop_arr(read_rgb(path), self.res)
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1
        return x, label


def build_dataset(name_or_path, res, data_dir=None, channels=1):
    """Returns (dataset, num_classes, channels). 'fashion-mnist' or a folder path; channels only
    matters for Fashion-MNIST (1, or 3 to replicate grey into RGB); image folders are always RGB."""
    if name_or_path == "fashion-mnist":
        return FashionMNIST(data_dir, res, channels), FashionMNIST.num_classes, channels
    dataset = ImageFolder(name_or_path, res)
    return dataset, dataset.num_classes, 3


def check_resolution(res, patch_size, vae_factor=1):
    """The model cuts its input into patch_size tiles, and a VAE first shrinks images by
    vae_factor."""
    step = vae_factor * patch_size
    if res <= 0 or res % step:
        why = f"patch size {patch_size}" + (f" x VAE downsampling {vae_factor}" if vae_factor > 1
                                            else "")
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
    # diffusers raises OSError, ValueError or hub errors depending on what went wrong
    except Exception as e:
        raise DataError(f"could not load the VAE {name_or_path!r} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0]}); "
                        "pass a local folder with config.json and the weights, or a hub id such as "
                        "stabilityai/sd-vae-ft-ema (needs internet access once)") from None
    return vae.to(device).eval().requires_grad_(False)


def vae_factor(vae):
    """How much the VAE shrinks each side (8 for Stable Diffusion's)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def per_frame(fn, x):
    """Apply an image function to clips (N, C, T, H, W) frame by frame; images (N, C, H, W) pass
    straight through."""
    if x.ndim == 4:
        return fn(x)
    return fn(x.transpose(1, 2).flatten(0, 1)).unflatten(0, (x.shape[0], -1)).transpose(1, 2)


def vae_encode(vae, x):
    """Images (or clips) in [-1, 1] -> latents with roughly unit variance (a posterior sample, as in
    LDM/DiT/DiM training)."""
    return per_frame(lambda im: vae.encode(im).latent_dist.sample() * vae.config.scaling_factor, x)


@torch.no_grad()
def vae_decode(vae, z):
    return per_frame(lambda lat: vae.decode(lat / vae.config.scaling_factor).sample, z)


#################################################################################
#                                 Saving images                                 #
#################################################################################

def to_pil(x):
    """One image in [-1, 1], (C, H, W) with C = 1 or 3 -> PIL image."""
    arr = ((x.float().clamp(-1, 1) + 1)
           * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def save_grid(x, path, nrow=None, pad=2):
    """Tile a batch (N, C, H, W) in [-1, 1] into one PNG, nrow images per row (default: about
    square)."""
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), -1.0)
    for i in range(n):
        top, left = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
        grid[:, top:top + h, left:left + w] = x[i].float().cpu()
    to_pil(grid).save(path)


#################################################################################
#        Video (bidim.py): Moving Fashion-MNIST, video folders, GIF writers      #
#################################################################################
# Every video dataset returns (clip, label): clip in [-1, 1] of shape (C, T, H, W), channels then
# time, as the models take it. As for images there is no randomness at load time: item i is always
# the same clip.

# one file = one video
VIDEO_EXTENSIONS = (".gif",)
FRAME_EXTENSIONS = tuple(e for e in IMAGE_EXTENSIONS if e not in VIDEO_EXTENSIONS)


#################################################################################
#                              Moving Fashion-MNIST                             #
#################################################################################

class MovingFashionMNIST(Dataset):
    """`digits` Fashion-MNIST objects moving in straight lines and bouncing off the walls of a size
    x size frame.

    As Moving MNIST: 28 x 28 objects in 64 x 64 frames, overlaps combined with max, random start
    position and direction. Objects scale with the frame (round(28 * size / 64) pixels, the same
    proportion at any size), speeds are uniform in [2, 5] * size / 64 pixels per frame. Clip i is
    drawn from numpy's Generator seeded with (seed, i): the same clip every time, independent of the
    other items. Label: the class of the first object, so the clips support class-conditional
    generation. Returns ((1, num_frames, size, size) in [-1, 1], label).
    """
    num_classes = 10
    channels = 1

    def __init__(self, root=None, num_frames=16, size=64, digits=2, num_clips=10000, seed=0):
        if num_frames < 1 or digits < 1 or num_clips < 1 or size < 8:
            raise DataError("MovingFashionMNIST needs num_frames, digits, num_clips >= 1 and size "
                            ">= 8; got "
                            f"num_frames={num_frames}, digits={digits}, num_clips={num_clips}, "
                            f"size={size}")
        images, labels = load_fashion_mnist(root or FASHION_MNIST_DIR)
        self.object_size = round(28 * size / 64)
        if self.object_size != 28:   # resize all objects once, with anti-aliasing when shrinking
            x = torch.from_numpy(images.copy()).unsqueeze(1).float()
            x = F.interpolate(x, size=self.object_size, mode="bilinear", antialias=True,
                              align_corners=False)
            images = x.round().clamp(0, 255).to(torch.uint8).squeeze(1).numpy()
        self.images, self.labels = images, labels
        self.num_frames, self.size, self.digits, self.num_clips, self.seed = num_frames, size, digits, num_clips, seed

    def __len__(self):
        return self.num_clips

    def trajectory(self, i):
        """Clip i's objects and motion: (object indices (digits,), top-left corners (num_frames,
        digits, 2) as integer (row, column)), every corner within [0, size - object_size]."""
        if not 0 <= i < self.num_clips:
            raise IndexError(f"clip {i} out of range for {self.num_clips} clips")
        rng = np.random.default_rng((self.seed, i))
        objects = rng.integers(0, len(self.images), self.digits)
        room = self.size - self.object_size
        pos = rng.uniform(0, room, (self.digits, 2))
        angle = rng.uniform(0, 2 * math.pi, self.digits)
        # < room: one reflection suffices
        speed = rng.uniform(2, 5, self.digits) * self.size / 64
        vel = np.stack([np.sin(angle), np.cos(angle)], axis=1) * speed[:, None]
        corners = []
        for _ in range(self.num_frames):
            corners.append(np.rint(pos).astype(np.int64))
            pos = pos + vel
            # bounce: reflect off the wall
            low, high = pos < 0, pos > room
            pos = np.where(low, -pos, np.where(high, 2 * room - pos, pos))
            vel = np.where(low | high, -vel, vel)
        return objects, np.clip(np.stack(corners), 0, room)

    def __getitem__(self, i):
        objects, corners = self.trajectory(i)
        s = self.object_size
        clip = np.zeros((self.num_frames, self.size, self.size), dtype=np.uint8)
        for k, obj in enumerate(objects):
            for t, (r, c) in enumerate(corners[:, k]):
                np.maximum(clip[t, r:r + s, c:c + s], self.images[obj],
                           out=clip[t, r:r + s, c:c + s])
        return torch.from_numpy(clip).float().div(127.5).sub(1)[None], int(self.labels[objects[0]])


#################################################################################
#                                 Video folders                                 #
#################################################################################

def gif_length(path):
    """Number of frames in a GIF; DataError naming the file if it cannot be read."""
    try:
        with Image.open(path) as img:
            return getattr(img, "n_frames", 1)
    # PIL's UnidentifiedImageError is an OSError; DecompressionBombError: an absurd header
    except (OSError, EOFError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read video {path}: {e}") from None


class VideoFolder(Dataset):
    """Unconditional RGB clips from a folder of videos, searched recursively: every folder that
    directly holds frame images (any of data.py's image types but GIF, sorted by name) is one video,
    and every .gif file is one video. Each video of n frames gives n // num_frames clips of
    num_frames consecutive frames (stride num_frames, non-overlapping; pass stride for more); frames
    are centre-cropped and resized to size x size as data.py's ImageFolder does. Videos shorter than
    num_frames are skipped (listed in .short_videos, counted in .skipped; train.py names them). An
    unreadable GIF stops construction, an unreadable frame stops training, each with an error naming
    the file. Returns ((3, num_frames, size, size) in [-1, 1], 0); num_classes = 0 (train.py then
    trains with y = None).
    """
    num_classes = 0
    channels = 3

    def __init__(self, root, num_frames, size, stride=None):
        if not os.path.isdir(root):
            raise DataError(f"no such folder of videos: {root!r}")
        if num_frames < 1:
            raise DataError(f"num_frames must be >= 1, got {num_frames}")
        self.videos = []   # (path, frame paths or None for a GIF, number of frames)
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files = sorted(f for f in files if not f.startswith("."))
            frames = [os.path.join(folder, f) for f in files
                      if f.lower().endswith(FRAME_EXTENSIONS)]
            if frames:
                self.videos.append((folder, frames, len(frames)))
            for f in files:
                if f.lower().endswith(VIDEO_EXTENSIONS):
                    path = os.path.join(folder, f)
                    self.videos.append((path, None, gif_length(path)))
        if not self.videos:
            raise DataError(f"{root} holds no videos: expected subfolders of frame images "
                            f"({', '.join(FRAME_EXTENSIONS)}) or {', '.join(VIDEO_EXTENSIONS)} "
                            "files")
        stride = stride or num_frames
        self.clips = [(v, start) for v, (_, _, n) in enumerate(self.videos)
                      for start in range(0, n - num_frames + 1, stride)]
        self.short_videos = [path for path, _, n in self.videos if n < num_frames]
        self.skipped = len(self.short_videos)
        if not self.clips:
            raise DataError(f"all {len(self.videos)} videos in {root} are shorter than "
                            f"num_frames={num_frames} "
                            f"(the longest has {max(n for _, _, n in self.videos)} frames)")
        self.num_frames, self.size = num_frames, size

    def __len__(self):
        return len(self.clips)

    def read_frames(self, v, start):
        """num_frames PIL images (RGB) of video v from frame start."""
        path, frames, _ = self.videos[v]
        if frames is None:
            try:
                with Image.open(path) as img:
                    out = []
                    for k in range(start, start + self.num_frames):
                        img.seek(k)
                        out.append(to_rgb(img, path))
                    return out
            except (OSError, EOFError, Image.DecompressionBombError) as e:
                raise DataError(f"cannot read video {path}: {e}") from None
        return [read_rgb(frame, "frame") for frame in frames[start:start + self.num_frames]]

    def __getitem__(self, i):
        arr = np.stack([center_crop_arr(img, self.size)
                        for img in self.read_frames(*self.clips[i])])  # (T, H, W, 3)
        return torch.from_numpy(arr).permute(3, 0, 1, 2).float() / 127.5 - 1, 0


def build_video_dataset(name_or_path, res, num_frames, data_dir=None):
    """Returns (dataset, num_classes, channels) like data.build_dataset: 'moving-fashion-mnist' (res
    x res frames) or a folder of videos."""
    if name_or_path == "moving-fashion-mnist":
        return (MovingFashionMNIST(data_dir, num_frames=num_frames, size=res),
                MovingFashionMNIST.num_classes, MovingFashionMNIST.channels)
    return VideoFolder(name_or_path, num_frames, res), VideoFolder.num_classes, VideoFolder.channels


#################################################################################
#                                 Saving videos                                 #
#################################################################################

def _as_batch(clip):
    """(C, T, H, W) or (N, C, T, H, W) -> (N, C, T, H, W) on the CPU, float."""
    if clip.dim() == 4:
        clip = clip[None]
    if clip.dim() != 5 or clip.shape[1] not in (1, 3):
        raise ValueError(f"expected a clip (C, T, H, W) or clips (N, C, T, H, W) with C = 1 or 3, "
                         f"got {tuple(clip.shape)}")
    return clip.detach().float().cpu()


def save_gif(clip, path, fps=8, nrow=None, pad=2):
    """Write clips in [-1, 1] as one looping GIF; a batch (N, C, T, H, W) plays as a grid, nrow
    clips per row (default about square). Pillow merges identical consecutive frames into one longer
    frame."""
    clips = _as_batch(clip)
    n, c, T, h, w = clips.shape
    if n > 1:   # tile every frame into a grid, clip k at row k // nrow, column k % nrow
        nrow = nrow or math.ceil(math.sqrt(n))
        rows = math.ceil(n / nrow)
        grid = torch.full((c, T, rows * (h + pad) + pad, nrow * (w + pad) + pad), -1.0)
        for k in range(n):
            top, left = pad + (k // nrow) * (h + pad), pad + (k % nrow) * (w + pad)
            grid[:, :, top:top + h, left:left + w] = clips[k]
        clips = grid[None]
    frames = [to_pil(clips[0, :, t]) for t in range(T)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps),
                   loop=0)


def save_frame_strip(clip, path, pad=2):
    """Write clips in [-1, 1] as one PNG: the frames of each clip left to right, one clip per
    row."""
    clips = _as_batch(clip)
    T = clips.shape[2]
    # (N*T, C, H, W), T per row
    save_grid(clips.transpose(1, 2).flatten(0, 1), path, nrow=T, pad=pad)
