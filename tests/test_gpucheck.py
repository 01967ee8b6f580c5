"""The prepared GPU check (confeti/gpucheck.py) on a CPU: ``gpu-check --tiny`` runs the same code
at the smoke size and writes every field of gpu_check.json."""

import json

import pytest

from confeti.__main__ import main

PHASES = {"stylize", "pseudo_labels", "class_mix", "prototype_update", "student_source",
          "semantic_consistency", "cut_steps", "student_mixed", "target_contrast", "optimizer"}  # fmt: skip


def test_tiny_gpu_check_on_cpu(tmp_path, capsys):
    main(["gpu-check", "--out", str(tmp_path), "--tiny"])
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert json.loads(capsys.readouterr().out.split("wrote")[0]) == {
        "ok": True, "total_sec": res["total_sec"]}  # fmt: skip
    assert res["ok"] and res["tiny"] and res["device"]["name"] == "cpu"
    assert (tmp_path / "data" / "gta5").is_dir() and (tmp_path / "data" / "cityscapes").is_dir()

    bf16 = res["precision"]["bf16"]
    assert bf16["finite"] and bf16["iterations"] == 4 and len(bf16["losses"]) == 4
    assert {"pc_tgt", "psc", "seg_mix", "loss_G"} <= set(bf16["losses"][-1])  # all losses ran
    assert bf16["sec_per_iter"] > 0 and set(bf16["per_phase_mb"]) == PHASES
    assert "skipped" in res["precision"]["fp16"]  # no CUDA

    agree = res["agreement"]
    assert agree["bf16"]["agree"] and not agree["bf16"]["missing"]
    assert "0.05" in agree["tolerance"] and "seg_src" in agree["fp32"]

    est = res["estimate"]
    assert set(est["per_phase"]) == PHASES
    for phase, row in est["per_phase"].items():  # same instrument on CPU: near-identical
        assert row["ratio"] == pytest.approx(1.0, abs=0.05), phase
    assert est["measured_peak_mb"] == pytest.approx(est["estimate_peak_mb"], rel=0.05)

    assert "skipped" in res["fit_11gb"]
    assert res["loader"]["images_per_sec"] > 0 and "keeps_up" in res["loader"]
    assert res["nccl"]["tested"] is False and "gloo" in res["nccl"]["note"]
    assert res["total_sec"] < 60


def test_full_check_needs_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit, match="--tiny"):
        main(["gpu-check", "--out", str(tmp_path)])
