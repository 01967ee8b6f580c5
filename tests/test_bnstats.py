"""AdaBN: BatchNorm statistics re-estimated on one domain, weights untouched."""

import json

import pytest
import torch
from torch import nn

from confeti.bnstats import recompute_bn_stats


def test_running_stats_are_the_average_over_the_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.1), nn.ReLU())
    weights = [p.detach().clone() for p in model.parameters()]
    batches = [torch.randn(2, 3, 8, 8) * (i + 1) + i for i in range(3)]
    assert recompute_bn_stats(model, batches) == 3
    conv, bn = model[0], model[1]
    with torch.no_grad():
        feats = [conv(x) for x in batches]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    assert torch.allclose(bn.running_mean, mean, atol=1e-5)
    assert torch.allclose(bn.running_var, var, rtol=1e-4)
    assert bn.momentum == 0.1 and not model.training  # restored, ready to evaluate
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    with pytest.raises(ValueError, match="no batch"):
        recompute_bn_stats(model, [])
    with pytest.raises(ValueError, match="no BatchNorm"):
        recompute_bn_stats(nn.Conv2d(3, 3, 1), batches)


def test_cli_eval_bn_stats_writes_its_own_file(toy, tmp_path):
    from confeti.__main__ import build_config, main
    from confeti.runner import train

    run = tmp_path / "run"
    train(build_config("smoke", iters=4), "source_only", toy, run, progress=False)
    own = (run / "eval.json").read_text()
    main(["eval", "--ckpt", str(run / "checkpoint.pt"), "--data", str(toy),
          "--bn-stats", "target", "--bn-batches", "3"])  # fmt: skip
    res = json.loads((run / "eval_bn_target.json").read_text())
    assert res["bn_stats"] == "target" and res["bn_batches"] == 3 and 0 <= res["miou"] <= 100
    assert (run / "eval.json").read_text() == own  # the run's own score is never replaced
