"""Tests for data.py: IDX parsing and its errors, Fashion-MNIST, image folders, resolution checks,
VAE helpers."""
import gzip
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from data import (FASHION_MNIST_DIR, DataError, FashionMNIST, ImageFolder, build_dataset,
                  center_crop_arr,
                  check_resolution, read_idx, save_grid, vae_decode, vae_encode, vae_factor)

HAVE_FMNIST = os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="apt-get install dataset-fashion-mnist")


def test_read_idx_roundtrip_and_errors(tmp_path, fake_fmnist):
    fake_fmnist(tmp_path, n=5)
    images = read_idx(tmp_path / "train-images-idx3-ubyte.gz", 0x00000803)
    assert images.shape == (5, 28, 28) and images.dtype == np.uint8
    with pytest.raises(DataError, match="magic number"):  # a label file where images are expected
        read_idx(tmp_path / "train-labels-idx1-ubyte.gz", 0x00000803)
    truncated = tmp_path / "truncated.gz"
    with gzip.open(truncated, "wb") as f:
        f.write(struct.pack(">IIII", 0x00000803, 5, 28, 28) + b"\0" * 100)
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(truncated, 0x00000803)
    not_gzip = tmp_path / "not_gzip.gz"
    not_gzip.write_bytes(b"hello, this is not gzip")
    with pytest.raises(DataError, match="not a readable gzip"):
        read_idx(not_gzip, 0x00000803)


def test_fashion_mnist_errors(tmp_path, fake_fmnist):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST(str(tmp_path / "missing"))
    fake_fmnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"corrupt")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        FashionMNIST(str(tmp_path))


def test_fake_fashion_mnist_padding(tmp_path, fake_fmnist):
    fake_fmnist(tmp_path)
    ds, num_classes, channels = build_dataset("fashion-mnist", 32, data_dir=str(tmp_path),
                                              channels=3)
    x, y = ds[3]
    assert (len(ds), num_classes, channels, x.shape, int(y)) == (12, 10, 3, (3, 32, 32), 3)
    assert (x[:, :2] == -1).all() and (x[:, :, -2:] == -1).all()  # black (background) padding
    assert (x[:, 2:30, 2:30] == 1).all()


@needs_fmnist
def test_real_fashion_mnist():
    ds = FashionMNIST(res=16)
    x, y = ds[0]
    assert len(ds) == 60000 and x.shape == (1, 16, 16) and ds.images.dtype == torch.uint8
    assert x.min() >= -1 and x.max() <= 1 and 0 <= int(y) < 10
    assert torch.bincount(ds.labels).tolist() == [6000] * 10


def test_image_folder(tmp_path, image_folder):
    image_folder(tmp_path / "cond", 3, classes=["b_cats", "a_dogs"])
    ds, num_classes, channels = build_dataset(str(tmp_path / "cond"), 8)
    assert (len(ds), num_classes, channels) == (6, 2, 3)
    assert ds.classes == ["a_dogs", "b_cats"] and ds[0][1] == 0 and ds[5][1] == 1
    x, _ = ds[0]
    assert x.shape == (3, 8, 8) and x.min() >= -1 and x.max() <= 1
    image_folder(tmp_path / "uncond", 2, size=(9, 9))
    ds, num_classes, _ = build_dataset(str(tmp_path / "uncond"), 4)
    assert (len(ds), num_classes, ds[1][0].shape) == (2, 0, (3, 4, 4))


def test_image_folder_errors(tmp_path, image_folder):
    with pytest.raises(DataError, match="no such folder"):
        build_dataset(str(tmp_path / "nope"), 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        build_dataset(str(tmp_path / "empty"), 8)
    image_folder(tmp_path / "bad", 2)
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    ds = ImageFolder(str(tmp_path / "bad"), 8)
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        [ds[i] for i in range(len(ds))]


def test_center_crop_arr():
    img = Image.new("RGB", (300, 100))
    assert center_crop_arr(img, 32).shape == (32, 32, 3)
    # upscales small images
    assert center_crop_arr(Image.new("RGB", (10, 20)), 16).shape == (16, 16, 3)


def test_check_resolution():
    check_resolution(32, 2)
    check_resolution(64, 2, 8)
    with pytest.raises(DataError, match="not divisible by 2"):
        check_resolution(15, 2)
    with pytest.raises(DataError, match="VAE"):
        check_resolution(40, 2, 8)


def test_save_grid(tmp_path):
    save_grid(torch.rand(5, 3, 8, 8) * 2 - 1, tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").size == (3 * 10 + 2, 2 * 10 + 2)
    save_grid(torch.zeros(2, 1, 4, 4), tmp_path / "grey.png", nrow=2)
    assert Image.open(tmp_path / "grey.png").mode == "L"


def test_vae_encode_decode_shapes(tiny_vae):
    vae = tiny_vae
    assert vae_factor(vae) == 8
    z = vae_encode(vae, torch.rand(2, 3, 32, 32) * 2 - 1)
    assert z.shape == (2, 4, 4, 4)
    assert vae_decode(vae, z).shape == (2, 3, 32, 32)


def test_load_vae_errors(tmp_path):
    pytest.importorskip("diffusers")
    from data import load_vae
    with pytest.raises(DataError, match="could not load the VAE"):
        load_vae(str(tmp_path / "no_such_vae"))
