import math

import pytest
import torch

from confeti.metrics import confusion_matrix, evaluate, format_table, iou, summarize


def test_hand_computed_iou_with_ignore():
    # ground truth / prediction, 3 classes, 255 = ignore
    gt = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pr = torch.tensor([[0, 1, 1], [1, 0, 2]])
    conf = confusion_matrix(pr, gt, 3)
    # class 0: TP 1, FN 1 (pred 1), FP 1 (gt 2 -> 0): IoU 1/3
    # class 1: TP 2, FP 1: IoU 2/3;  class 2: TP 0, FN 1: IoU 0; the ignored pixel counts nowhere
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    v = iou(conf)
    assert torch.allclose(v, torch.tensor([1 / 3, 2 / 3, 0.0]))


def test_absent_class_is_nan_and_left_out_of_the_mean():
    gt = torch.tensor([0, 0, 1, 1])
    pr = torch.tensor([0, 0, 1, 0])
    conf = confusion_matrix(pr, gt, 19)
    v = iou(conf)
    assert math.isclose(v[0], 2 / 3, rel_tol=1e-6) and math.isclose(v[1], 1 / 2, rel_tol=1e-6)
    assert torch.isnan(v[2:]).all()
    s = summarize(conf)
    assert s["miou"] == round((2 / 3 + 1 / 2) / 2 * 100, 2)
    assert s["iou"]["wall"] is None and s["num_classes"] == 19
    assert "road" in format_table(s)


def test_out_of_range_predictions_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        confusion_matrix(torch.tensor([7, -1, 0]), torch.tensor([0, 0, 0]), 3)
    # ... unless they sit on ignored pixels
    assert confusion_matrix(torch.tensor([7, 0]), torch.tensor([255, 0]), 3)[0, 0] == 1


def test_subsets_16_and_13():
    conf = torch.zeros(19, 19, dtype=torch.long)
    for k in range(19):
        conf[k, k] = 1
    conf[3, 0] = 1  # wall half wrong: IoU(wall) = 1/2, IoU(road) = 1/2
    s = summarize(conf)
    assert s["miou13"] == round((12 + 0.5) / 13 * 100, 2)  # road in, wall out
    assert s["miou16"] == round((14 + 0.5 + 0.5) / 16 * 100, 2)


def test_evaluate_upsamples_logits_to_the_label_size():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            logits = torch.zeros(x.shape[0], 3, 2, 2)
            logits[:, 1] = 1.0  # predicts class 1 everywhere
            return logits, None

    data = [(torch.zeros(1, 3, 8, 8), torch.ones(1, 8, 8, dtype=torch.long))]

    class Loader(list):
        dataset = [0]

    conf = evaluate(Fixed(), Loader(data), "cpu", num_classes=3, progress=False)
    assert conf[1, 1] == 64 and conf.sum() == 64
