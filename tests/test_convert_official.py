"""tools/convert_official.py: official state dicts of DiM, DiMSUM, LaMamba-Diff (the fidelity
vectors, laid out with official key names) and DiT become train.py checkpoints that reproduce the
official outputs; bad files fail with one line."""
import pytest
import torch

import dit
from models import load_model
from tools import convert_official

# name -> (registry config it must be recognised as, tolerance of the fidelity test in
# tests/test_<model>.py)
VECTORS = {"dim_small": ("DiM-T/2", 5e-5), "dimsum_small": ("DiMSUM-T/2", 1.5e-5),
           "lamamba_small": ("LaMamba-T", 2e-6)}


@pytest.mark.parametrize("name", list(VECTORS))
def test_fidelity_weights_convert_to_a_checkpoint_that_reproduces_the_official_output(
        name, fidelity, relative_error, tmp_path, capsys, one_thread):
    tensors, meta = fidelity(name)
    official = {k: v for k, v in tensors.items() if k.startswith("model.")}
    torch.save({k.removeprefix("model."): v for k, v in official.items()},
               tmp_path / "official.pth")
    out = tmp_path / "converted.pt"
    convert_official.main([str(tmp_path / "official.pth"), "--out", str(out)])
    printed = capsys.readouterr().out
    config, tolerance = VECTORS[name]
    assert f"-> {config} (" in printed and "classes" in printed and "tensors mapped" in printed, printed
    model, ckpt = load_model(str(out))
    assert ckpt["model_name"] == config and ckpt["step"] == 0 and ckpt["model_kwargs"]["num_classes"] == 10
    assert ckpt["model_kwargs"]["input_size"] == tensors["input.x"].shape[-1]
    with torch.no_grad():
        y = model.eval()(tensors["input.x"], tensors["input.t"], tensors["input.y"])
    assert relative_error(y, tensors["output"]) < tolerance


def test_dit_weights_and_model_override(tmp_path, capsys):
    torch.manual_seed(0)
    ours = dit.DiT_T_2(input_size=8, num_classes=10).eval()
    torch.nn.init.normal_(ours.final_layer.linear.weight)  # a non-zero output
    official = {"module." + k: v for k, v in ours.state_dict().items()}
    # DiT stores its fixed table; grid 4 x patch 2 = latent 8
    official["pos_embed"] = torch.zeros(1, 16, 64)
    torch.save(official, tmp_path / "DiT.pt")
    ckpt = convert_official.main([str(tmp_path / "DiT.pt"), "--out", str(tmp_path / "c.pt"),
                                  "--vae", "some/vae"])
    assert ckpt["model_name"] == "DiT-T/2" and ckpt["args"]["res"] == 64 and ckpt["args"]["vae"] == "some/vae"
    model, _ = load_model(str(tmp_path / "c.pt"))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 10])
    assert torch.equal(model.eval()(x, t, y), ours(x, t, y))
    with pytest.raises(SystemExit, match="no DiT config .* DiT-S/2"):
        convert_official.main([str(tmp_path / "DiT.pt"), "--out", str(tmp_path / "c.pt"), "--model",
                               "DiT-S/2"])


def test_bad_files_fail_with_one_line(tmp_path):
    torch.save({"a.weight": torch.zeros(2)}, tmp_path / "other.pt")
    torch.save(dit.DiT_T_2(input_size=8).state_dict(), tmp_path / "full.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:3000])
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for path, message in [("missing.pt", "not found"), ("other.pt", "no key of an official"),
                          ("truncated.pt", "truncated or corrupt"),
                          ("text.pt", "truncated or corrupt")]:
        with pytest.raises(SystemExit) as e:
            convert_official.main([str(tmp_path / path), "--out", str(tmp_path / "c.pt")])
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
