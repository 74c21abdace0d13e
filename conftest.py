"""Shared pytest fixtures. This file also puts the repository root on sys.path (pytest inserts a
rootdir conftest's folder), so tests/ and the top-level test_models.py import the library the same
way."""
import gzip
import importlib.util
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tools.convert_official import read_safetensors

ROOT = Path(__file__).parent
FIDELITY_DIR = ROOT / "fidelity"


@pytest.fixture(scope="module")
def one_thread():
    """Pin torch to one intra-op thread for a module of many tiny ops: on a shared 2-core runner two
    threads made each small op 10-100x slower, one is steady."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------------
# Fidelity vectors: official models' outputs on known weights (fidelity/README.md)
# ------------------------------------------------------------------------------------------------------

def load_fidelity(name):
    """(tensors, meta) of fidelity/NAME.{safetensors,json}. The vectors ship in the repository, so a
    missing one is a failure, never a skip."""
    path = FIDELITY_DIR / f"{name}.safetensors"
    if not path.exists():
        pytest.fail(f"fidelity vector {path} is missing (it ships in the repository)")
    return read_safetensors(path), json.loads(path.with_suffix(".json").read_text())


@pytest.fixture
def fidelity():
    """load(name) -> (tensors, meta) of a fidelity vector; fails if the vector is missing."""
    return load_fidelity


@pytest.fixture
def perturb():
    """perturb(model, scale, seed=0): add scale * N(0, 1) noise to every parameter (the real inits
    zero the output layers and adaLNs, which would hide what the input does); returns the model."""
    def perturb(model, scale, seed=0):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
        return model
    return perturb


@pytest.fixture
def traced_compile(monkeypatch):
    """torch.compile with backend aot_eager for the test: Dynamo and AOT autograd trace as usual, the graphs
    run eagerly (Inductor's C++ build of each shape costs tens of seconds on a CPU). Returns the list of
    functions compiled."""
    compiled, compile = [], torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda fn, **kw: compiled.append(fn) or compile(fn, backend="aot_eager"))
    return compiled


@pytest.fixture
def graph_counter():
    """(backend, graphs): a torch.compile backend that runs each graph Dynamo hands it as traced and
    appends it to `graphs`, so a test can count how often a model is compiled."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend, graphs


@pytest.fixture
def relative_error():
    """max |a - b| / max |b|."""
    return lambda a, b: ((a - b).abs().max() / b.abs().max()).item()


# ------------------------------------------------------------------------------------------------------
# Data on disk
# ------------------------------------------------------------------------------------------------------

def write_idx(path, array, magic):
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fmnist():
    """write(folder, n=12): a tiny Fashion-MNIST training set (white images, labels 0..9
    cycling)."""
    def write(folder, n=12):
        os.makedirs(folder, exist_ok=True)
        write_idx(os.path.join(folder, "train-images-idx3-ubyte.gz"), np.full((n, 28, 28), 255),
                  0x00000803)
        write_idx(os.path.join(folder, "train-labels-idx1-ubyte.gz"), np.arange(n) % 10, 0x00000801)
    return write


@pytest.fixture
def image_folder():
    """write(folder, n, size=(20, 14), classes=()): n flat-colour PNGs per class subfolder (or in
    folder)."""
    def write(folder, n, size=(20, 14), classes=()):
        for c in classes or [""]:
            os.makedirs(os.path.join(folder, c), exist_ok=True)
            for i in range(n):
                Image.new("RGB", size, (40 * i % 256, 80,
                                        160)).save(os.path.join(folder, c, f"{i}.png"))
    return write


@pytest.fixture
def tiny_vae():
    """A random diffusers AutoencoderKL with Stable Diffusion's 8x downsampling (4 down blocks), 4
    latents."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                   block_out_channels=(8,) * 4,
                                   down_block_types=("DownEncoderBlock2D",) * 4,
                                   up_block_types=("UpDecoderBlock2D",) * 4,
                                   layers_per_block=1, norm_num_groups=4, sample_size=32).eval()


@pytest.fixture
def free_port():
    """A TCP port free at the time of the call, for torchrun's rendezvous."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------------
# Triton's interpreter: kernel cases in a subprocess
# ------------------------------------------------------------------------------------------------------
# TRITON_INTERPRET=1 must be set before triton is imported, so tests/test_ssm.py and
# tests/test_ssm_triton.py each run their kernel cases in one subprocess (minutes on 2 cores) and
# check its results. Both start when collection ends and run side by side, not one after the other.
INTERPRETER_WORKERS = {"test_ssm": "_triton_worker", "test_ssm_triton": "_worker"}
_started = {}


def _start_worker(module):
    tests = str(ROOT / "tests")
    env = dict(os.environ, TRITON_INTERPRET="1", DIFFUSION_MAMBA_SCAN="",
               PYTHONPATH=os.pathsep.join([str(ROOT), tests, os.environ.get("PYTHONPATH", "")]))
    code = f"import {module}; {module}.{INTERPRETER_WORKERS[module]}()"
    # files, not pipes: a worker must never wait for the test process to read what it writes
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    return subprocess.Popen([sys.executable, "-c", code], cwd=tests, env=env, stdout=out, stderr=err,
                            text=True), out, err


def pytest_collection_finish(session):
    if importlib.util.find_spec("triton") is None:
        return
    collected = {getattr(getattr(item, "module", None), "__name__", None) for item in session.items}
    for module in sorted(collected & INTERPRETER_WORKERS.keys()):
        _started[module] = _start_worker(module)


def pytest_sessionfinish(session):
    for proc, _, _ in _started.values():  # a worker whose tests were deselected or stopped early
        proc.kill()


@pytest.fixture(scope="session")
def interpreter_results():
    """results(module): the JSON line printed by that test module's worker (see above)."""
    def results(module):
        proc, out, err = _started.pop(module, None) or _start_worker(module)
        proc.wait(timeout=1800)
        out.seek(0)
        err.seek(0)
        assert proc.returncode == 0, err.read()[-3000:]
        return json.loads(out.read().strip().splitlines()[-1])
    return results
