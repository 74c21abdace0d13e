"""Tests for data.py: IDX parsing and its errors, Fashion-MNIST, image folders, resolution checks,
VAE helpers."""
import gzip
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from data import (FASHION_MNIST_DIR, DataError, FashionMNIST, ImageFolder, VideoFolder,
                  build_dataset, center_crop_arr, check_resolution, read_idx, read_rgb, save_grid,
                  vae_decode, vae_encode, vae_factor)

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


def test_corrupt_deflate_stream_and_decompression_bomb_are_one_line(tmp_path):
    # a gzip file whose deflate data is damaged: zlib.error inside gzip, not an OSError
    good = gzip.compress(struct.pack(">IIII", 0x00000803, 2, 28, 28) + bytes(range(256)) * 6)
    (tmp_path / "bad.gz").write_bytes(good[:10] + b"\xff" * 8 + good[18:])
    with pytest.raises(DataError, match="bad.gz is not a readable gzip IDX file"):
        read_idx(tmp_path / "bad.gz", 0x00000803)
    # a PNG header claiming 20000 x 20000 pixels (Pillow's DecompressionBombError)
    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                                        + chunk(b"IEND", b""))
    with pytest.raises(DataError, match="cannot read image .*bomb.png: Image size .*Remove it"):
        read_rgb(tmp_path / "bomb.png")


def test_deep_and_float_images_are_scaled_not_clipped(tmp_path):
    # the same ramp at 16-bit (PNG: I;16, PGM: I), as 32-bit integers and as floats in [0, 1]
    ramp = np.linspace(0, 1, 64)[None].repeat(4, 0)
    expected = np.round(ramp * 255).astype(np.uint8)
    files = {"r16.png": np.round(ramp * 65535).astype(np.uint16),
             "r16.pgm": np.round(ramp * 65535).astype(np.uint16),
             "r32.tif": np.round(ramp * (2 ** 31 - 1)).astype(np.int32),
             "rf.tif": ramp.astype(np.float32)}
    for name, arr in files.items():
        Image.fromarray(arr).save(tmp_path / name)
        rgb = np.asarray(read_rgb(tmp_path / name))
        assert rgb.shape == (4, 64, 3), name
        assert np.abs(rgb[..., 0].astype(int) - expected).max() <= 1, name
        assert (rgb[..., 0] == rgb[..., 2]).all()
    # floats are read as [0, 1]: others cannot be scaled without guessing
    Image.fromarray((ramp * 255).astype(np.float32)).save(tmp_path / "f255.tif")
    with pytest.raises(DataError, match="f255.tif: a float image with values in \\[0, 255\\]"):
        read_rgb(tmp_path / "f255.tif")


def test_transparency_is_composited_on_black(tmp_path, image_folder):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = 200  # grey everywhere, opaque / half / transparent / transparent
    rgba[..., 3] = [[255, 128], [0, 0]]
    Image.fromarray(rgba).save(tmp_path / "a.png")
    Image.fromarray(rgba[..., [0, 3]], "LA").save(tmp_path / "la.png")
    for name in ("a.png", "la.png"):
        rgb = np.asarray(read_rgb(tmp_path / name))[..., 0]
        assert rgb.tolist() == [[200, 100], [0, 0]], name
    # and so the dataset sees black where the image is transparent
    (tmp_path / "folder").mkdir()
    Image.fromarray(rgba).resize((8, 8), Image.NEAREST).save(tmp_path / "folder" / "a.png")
    x, _ = ImageFolder(str(tmp_path / "folder"), 8)[0]
    assert x[:, 4:, :].eq(-1).all() and x[:, :4, :4].gt(0.5).all()


def test_empty_class_folders_and_loose_images_are_refused(tmp_path, image_folder):
    image_folder(tmp_path / "d", 2, classes=["cats", "dogs"])
    (tmp_path / "d" / "empty").mkdir()
    with pytest.raises(DataError, match="class folders of .* without images: empty"):
        ImageFolder(str(tmp_path / "d"), 8)
    (tmp_path / "d" / "empty").rmdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "loose.png")
    with pytest.raises(DataError, match="images beside its class folders \\(1, e.g. loose.png"):
        ImageFolder(str(tmp_path / "d"), 8)
    os.remove(tmp_path / "d" / "loose.png")
    assert len(ImageFolder(str(tmp_path / "d"), 8)) == 4


def test_short_videos_are_listed(tmp_path, image_folder):
    image_folder(tmp_path / "v" / "long", 4, size=(8, 8))
    image_folder(tmp_path / "v" / "short", 2, size=(8, 8))
    ds = VideoFolder(str(tmp_path / "v"), num_frames=3, size=8)
    assert len(ds) == 1 and ds.skipped == 1
    assert ds.short_videos == [str(tmp_path / "v" / "short")]
