"""tools/parity.py on the CPU: two scan backends agree on a whole model; a wrong one is caught."""
import json

import pytest

import ssm
from tools import parity

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: conftest.one_thread


def _run(tmp_path, fast, models="DiM-T/2,lamamba", res=64, dtype="fp32", reference="ref"):
    out = tmp_path / "parity.json"
    rc = parity.main(["--models", models, "--size", "T", "--res", str(res), "--batch", "2",
                      "--dtype", dtype, "--fast", fast, "--reference", reference, "--device", "cpu",
                      "--out", str(out)])
    return rc, json.loads(out.read_text())


def test_parity_of_two_backends(tmp_path):
    # the chunked PyTorch scan against the sequential loop: every gradient of two whole models, on
    # 8 x 8 latents (LaMamba: 64 tokens, several 16-step chunks of the scan)
    rc, rows = _run(tmp_path, "torch")
    assert rc == 0 and [r["model"] for r in rows] == ["DiM-T/2", "LaMamba-T"]
    for r in rows:
        assert r["ok"] and r["output_error"] < 1e-5 and r["worst_gradient_error"] < 1e-4, r
        assert r["parameters"] > 20


def test_parity_catches_a_wrong_scan(tmp_path, monkeypatch):
    # a scan 1% off (1% of its output reversed in time added: a plain scale would vanish in
    # LaMamba's LayerNorm after the scan) fails the fp32 tolerance, and the exit code says so. Both
    # backends are the sequential loop here, so on the smallest latent grid LaMamba takes (4 x 4).
    def off(*args, **kwargs):
        y = ssm.selective_scan_ref(*args, **kwargs)
        return y + 0.01 * y.flip(-1)

    monkeypatch.setitem(ssm.SCANS, "off", off)
    rc, rows = _run(tmp_path, "off", models="lamamba", res=32)
    assert rc == 1 and not any(r["ok"] for r in rows)
    assert all(max(r["output_error"], r["worst_gradient_error"]) > 1e-3 for r in rows)


def test_bf16_rule_passes_two_exact_scans_and_catches_a_wrong_one(tmp_path, monkeypatch):
    # bf16 autocast: the loop against the chunked PyTorch scan (both exact in fp32) passes on all
    # gradients together, though single parameters' bf16 errors differ (parity's docstring); a scan
    # 5% off fails (1% is within what bf16 rounding can hide; the fp32 rule above catches it)
    rc, rows = _run(tmp_path, "ref", models="DiM-T/2", dtype="bf16", reference="torch")
    assert rc == 0 and rows[0]["ok"] and rows[0]["all_gradients_ratio"] <= parity.TOLERANCE["bf16"]

    def off(*args, **kwargs):
        y = ssm.selective_scan_ref(*args, **kwargs)
        return y + 0.05 * y.flip(-1)

    monkeypatch.setitem(ssm.SCANS, "off", off)
    rc, rows = _run(tmp_path, "off", models="DiM-T/2", dtype="bf16", reference="torch")
    assert rc == 1 and not rows[0]["ok"]
