"""tools/export.py and the loaders that read its files (models.load_newest_checkpoint): a run
exported as safetensors + JSON, or as a Hub-layout folder, rebuilds the same model; reading never
unpickles; damaged files and JSON are one-line errors; Hub ids are resolved through
huggingface_hub's snapshot_download, replaced here by a fake (no network in tests)."""
import json
import pickle
import sys
import types

import pytest
import torch

import sample
from models import (ModelError, build_model, init_from_checkpoint, load_model,
                    read_safetensors, write_safetensors)
from tools import export

KWARGS = {"input_size": 8, "in_channels": 1, "num_classes": 10}
# every test here runs many tiny ops (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")
ARGS = {"model": "DiT-T/2", "data": "fashion-mnist", "res": 8, "vae": None, "steps": 30,
        "lr": 2e-4, "video": False, "compile": None, "results_dir": "/elsewhere/results"}


def make_run(folder, name="DiT-T/2", kwargs=KWARGS, step=30):
    """A run folder as train.py leaves it, with a model whose outputs depend on every weight."""
    torch.manual_seed(0)
    model = build_model(name, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # adaLN-Zero layers start at zero: wake them
    ckpt_dir = folder / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    state = model.state_dict()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, kwargs["in_channels"], 8, 8), torch.tensor([1, 2]),
          torch.tensor([0, 1])).sum().backward()
    opt.step()  # an optimizer state the size of two models, as in a real checkpoint
    torch.save({"model": state, "ema": state, "opt": opt.state_dict(), "step": step,
                "args": {**ARGS, "model": name}, "model_name": name, "model_kwargs": kwargs,
                "data": (0, step)}, ckpt_dir / f"{step:07d}.pt")
    (ckpt_dir / "latest").write_text(f"{step:07d}.pt\n")
    return model.eval()


def outputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, model.in_channels, 8, 8, generator=g)
    with torch.no_grad():
        return model.eval()(x, torch.tensor([1, 500, 999]), torch.tensor([0, 3, 10]))


@pytest.mark.parametrize("name", ["DiT-T/2", "DiM-T/2"])
def test_export_round_trip_gives_the_same_model(name, tmp_path, capsys):
    run = tmp_path / "000-run"
    ours = make_run(run, name)
    export.main([str(run)])  # beside the checkpoint, under its name
    export.main([str(run), "--hub-folder", str(tmp_path / "hub"), "--fid", "12.5",
                 "--fid-note", "10k samples", "--repo-id", "me/tiny"])
    assert "huggingface-cli upload me/tiny" in capsys.readouterr().out
    hub_config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert hub_config["fid"]["value"] == 12.5
    pair = run / "checkpoints" / "0000030.safetensors"
    config = json.loads((run / "checkpoints" / "0000030.json").read_text())
    assert config["model_name"] == name and config["model_kwargs"] == KWARGS
    assert config["step"] == 30 and config["res"] == 8 and "fid" not in config
    assert config["objective"] == "eps" and config["schedule"] in ("linear", "scaled_linear")
    assert "results_dir" not in config["args"]  # a path of the machine that trained it
    # weights only: a fraction of the training checkpoint
    assert pair.stat().st_size < 0.5 * (run / "checkpoints" / "0000030.pt").stat().st_size
    for source in (pair, tmp_path / "hub", tmp_path / "hub" / "model.safetensors"):
        model, ckpt = load_model(str(source))
        assert ckpt["step"] == 30 and ckpt["args"]["data"] == "fashion-mnist"
        assert torch.equal(outputs(model), outputs(ours)), source
    card = (tmp_path / "hub" / "README.md").read_text()
    assert f"python train.py --model {name} --data fashion-mnist --res 8 --steps 30" in card
    assert "| FID | 12.5 (10k samples) |" in card and "hf://me/tiny" in card
    assert "--video" not in card and "/elsewhere" not in card


def test_bfloat16_export_and_the_safetensors_package_agree(tmp_path):
    ours = make_run(tmp_path / "run")
    export.main([str(tmp_path / "run"), "--out", str(tmp_path / "half"), "--dtype", "bfloat16"])
    tensors = read_safetensors(tmp_path / "half.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in tensors.values() if t.is_floating_point())
    model, _ = load_model(str(tmp_path / "half.safetensors"))
    assert (outputs(model) - outputs(ours)).abs().max() < 0.05 * outputs(ours).abs().max()
    st = pytest.importorskip("safetensors.torch")
    theirs = st.load_file(tmp_path / "half.safetensors")
    assert theirs.keys() == tensors.keys() and all(torch.equal(theirs[k], tensors[k])
                                                   for k in tensors)
    mixed = {"f": torch.randn(3, 4), "i": torch.arange(5), "b": torch.tensor([True, False]),
             "h": torch.randn(2).half(), "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5)}
    st.save_file(mixed, tmp_path / "theirs.safetensors")
    write_safetensors(tmp_path / "ours.safetensors", mixed)
    for got in (read_safetensors(tmp_path / "theirs.safetensors"),
                st.load_file(tmp_path / "ours.safetensors")):
        assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in mixed.items())


def test_loading_an_export_runs_no_pickle(tmp_path, monkeypatch):
    ours = make_run(tmp_path / "run")
    export.main([str(tmp_path / "run"), "--out", str(tmp_path / "m")])

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling while loading a safetensors export")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    model, _ = load_model(str(tmp_path / "m.safetensors"))
    assert torch.equal(outputs(model), outputs(ours))


def test_damaged_files_and_json_are_one_line_errors(tmp_path):
    make_run(tmp_path / "run")
    export.main([str(tmp_path / "run"), "--out", str(tmp_path / "good")])
    blob = (tmp_path / "good.safetensors").read_bytes()
    config = json.loads((tmp_path / "good.json").read_text())
    n = int.from_bytes(blob[:8], "little")
    damaged = {"truncated": (blob[:-100], "past its end"), "empty": (b"", "too short"),
               "long_header": ((10 ** 9).to_bytes(8, "little") + blob[8:], "header in a file"),
               "garbage": (blob[:8] + b"\xff" * n + blob[8 + n:], "not JSON"),
               "trailing": (blob + b"\0" * 16, "bytes after the last tensor")}
    cases = []
    for name, (data, message) in damaged.items():
        (tmp_path / f"{name}.safetensors").write_bytes(data)
        (tmp_path / f"{name}.json").write_text(json.dumps(config))
        cases.append((name, message))
    (tmp_path / "nojson.safetensors").write_bytes(blob)
    cases.append(("nojson", "no nojson.json (nor config.json) beside it"))
    bad_json = {"notjson": ("{model_name", "not readable JSON"),
                # the config.json of an official Hub release (PyTorchModelHubMixin): not ours
                "official": (json.dumps({"img_resolution": 32, "num_classes": 1001}),
                             "not the JSON of a model exported by this project (no model_name"),
                "other_size": (json.dumps({**config, "model_kwargs": {**KWARGS,
                                                                      "num_classes": 5}}),
                               "the weights do not fit DiT-T/2"),
                "unknown": (json.dumps({**config, "model_name": "DiT-Q/9"}), "unknown model")}
    for name, (text, message) in bad_json.items():
        (tmp_path / f"{name}.safetensors").write_bytes(blob)
        (tmp_path / f"{name}.json").write_text(text)
        cases.append((name, message))
    for name, message in cases:
        with pytest.raises(ModelError) as e:
            load_model(str(tmp_path / f"{name}.safetensors"))
        assert message in str(e.value) and "\n" not in str(e.value), (name, str(e.value))


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A Hub repository as a local folder, served by a stand-in huggingface_hub module."""
    ours = make_run(tmp_path / "run")
    export.main([str(tmp_path / "run"), "--hub-folder", str(tmp_path / "snapshot")])
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision))
        if repo_id != "me/tiny":
            raise OSError(f"404 Client Error: Repository Not Found for url: .../{repo_id}")
        return str(tmp_path / "snapshot")
    monkeypatch.setitem(sys.modules, "huggingface_hub",
                        types.SimpleNamespace(snapshot_download=snapshot_download))
    monkeypatch.chdir(tmp_path)
    return ours, calls


def test_hub_ids_load_through_snapshot_download(fake_hub, tmp_path, monkeypatch):
    ours, calls = fake_hub
    for source, call in [("hf://me/tiny", ("me/tiny", None)), ("me/tiny", ("me/tiny", None)),
                         ("hf://me/tiny@v1", ("me/tiny", "v1"))]:
        model, _ = load_model(source)
        assert calls.pop() == call and torch.equal(outputs(model), outputs(ours))
    # a local folder of that name wins over the Hub; so does a path under a local folder
    (tmp_path / "me" / "tiny").mkdir(parents=True)
    with pytest.raises(ModelError, match="no readable checkpoint in me/tiny"):
        load_model("me/tiny")
    # a results folder instead of one of its runs: the error names a run to pass
    (tmp_path / "me" / "tiny" / "000-DiT-T-2" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ModelError, match="holds training runs.*000-DiT-T-2"):
        load_model("me/tiny")
    for local in ("me/tinny", "results/0000030.pt"):  # mistyped, never sent to the Hub
        with pytest.raises(ModelError, match="not found"):
            load_model(local)
    assert not calls
    # --init-from takes a Hub id too
    fresh = build_model("DiT-T/2", **KWARGS)
    copied, resized, skipped = init_from_checkpoint(fresh, "hf://me/tiny", "DiT-T/2")
    assert len(copied) == len(fresh.state_dict()) and not resized and not skipped
    assert torch.equal(outputs(fresh), outputs(ours))


def test_hub_errors_are_one_line(fake_hub, monkeypatch):
    for source, message in [("hf://me/missing", "me/missing cannot be downloaded (OSError: 404"),
                            ("someone/else", "someone/else is no local file or folder, and the "
                                             "Hugging Face Hub repository"),
                            ("hf://not a repo", "is not a Hub id")]:
        with pytest.raises(ModelError) as e:
            load_model(source)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(ModelError, match="needs huggingface_hub: pip install huggingface_hub"):
        load_model("hf://me/tiny")


def test_sample_py_takes_a_hub_id(fake_hub, tmp_path):
    sample.main(sample.parse_args(["--ckpt", "hf://me/tiny", "--num-samples", "2", "--steps", "2",
                                   "--out", str(tmp_path / "s")]))
    assert len(list((tmp_path / "s").glob("*.png"))) >= 2
