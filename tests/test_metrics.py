import math

import pytest
import torch

from confeti.labels import CLASSES
from confeti.metrics import confusion_matrix, evaluate, format_table, iou, summarize


def test_hand_computed_iou_with_ignore():
    # 3 classes, 255 = ignore. Pixel by pixel (gt -> pred):
    #   (0,0) 0->0 TP0 | (0,1) 0->1 FN0, FP1 | (0,2) 1->1 TP1
    #   (1,0) 1->1 TP1 | (1,1) 2->0 FN2, FP0 | (1,2) ignored (its prediction 2 counts nowhere)
    # class 0: TP 1, FP 1, FN 1 -> 1/3;  class 1: TP 2, FP 1, FN 0 -> 2/3;
    # class 2: TP 0, FP 0, FN 1 -> 0/1 = 0
    gt = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pr = torch.tensor([[0, 1, 1], [1, 0, 2]])
    conf = confusion_matrix(pr, gt, 3)
    assert conf.dtype == torch.long
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]  # rows gt, columns pred
    v = iou(conf)
    assert torch.allclose(v, torch.tensor([1 / 3, 2 / 3, 0.0]))
    s = summarize(conf, class_names=("a", "b", "c"))
    assert s["iou"] == {"a": 33.33, "b": 66.67, "c": 0.0}
    assert s["miou"] == 33.33 and s["num_classes"] == 3
    assert s["miou16"] is None and s["miou13"] is None  # subsets exist only for 19 classes


def test_absent_class_is_nan_and_left_out_of_the_mean():
    gt = torch.tensor([0, 0, 1, 1])
    pr = torch.tensor([0, 0, 1, 0])
    conf = confusion_matrix(pr, gt, 19)
    v = iou(conf)
    # class 0: TP 2, FP 1 -> 2/3; class 1: TP 1, FN 1 -> 1/2; classes 2..18: 0/0 -> NaN
    assert math.isclose(v[0], 2 / 3, rel_tol=1e-6) and math.isclose(v[1], 1 / 2, rel_tol=1e-6)
    assert torch.isnan(v[2:]).all()
    s = summarize(conf)
    assert s["miou"] == round((2 / 3 + 1 / 2) / 2 * 100, 2) == 58.33
    assert s["iou"]["wall"] is None and s["num_classes"] == 19
    assert list(s["iou"]) == list(CLASSES)
    table = format_table(s)
    assert "road" in table and "58.33" in table and "n/a" in table


def test_a_class_predicted_but_absent_has_iou_zero():
    conf = confusion_matrix(torch.tensor([2, 0]), torch.tensor([0, 0]), 3)
    assert iou(conf)[2] == 0 and torch.isnan(iou(conf)[1])  # FP only -> 0, nothing -> NaN


def test_out_of_range_predictions_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        confusion_matrix(torch.tensor([7, -1, 0]), torch.tensor([0, 0, 0]), 3)
    # ... unless they sit on ignored pixels
    assert confusion_matrix(torch.tensor([7, 0]), torch.tensor([255, 0]), 3)[0, 0] == 1


def test_subsets_16_and_13():
    conf = torch.zeros(19, 19, dtype=torch.long)
    for k in range(19):
        conf[k, k] = 1
    conf[3, 0] = 1  # wall half wrong: IoU(wall) = 1/2, IoU(road) = 1/2, the rest 1
    s = summarize(conf)
    assert s["miou"] == round((17 + 0.5 + 0.5) / 19 * 100, 2)
    assert s["miou16"] == round((14 + 0.5 + 0.5) / 16 * 100, 2)  # without terrain, truck, train
    assert s["miou13"] == round((12 + 0.5) / 13 * 100, 2)  # road in, wall/fence/pole out
    assert "miou13" in format_table(s)
    with pytest.raises(ValueError, match="class names"):
        summarize(torch.zeros(20, 20, dtype=torch.long))


class _Fixed(torch.nn.Module):
    """Logits at 1/4 of the input size: class 1 on the left half, class 2 on the right half."""

    def forward(self, x):
        b, _, h, w = x.shape
        logits = torch.zeros(b, 3, h // 4, w // 4)
        logits[:, 1, :, : w // 8] = 1.0
        logits[:, 2, :, w // 8 :] = 1.0
        return logits, None


def test_evaluate_upsamples_logits_to_the_label_size():
    # the image is 8x8 but the label 16x16: logits (2x2) go to 16x16, 8 columns per class
    label = torch.ones(1, 16, 16, dtype=torch.long)  # all class 1
    label[:, :4] = 255  # 4 ignored rows
    model = _Fixed().train()
    conf = evaluate(model, [(torch.zeros(1, 3, 8, 8), label)], "cpu", num_classes=3, progress=False)
    assert conf[1, 1] == 12 * 8 and conf[1, 2] == 12 * 8 and conf.sum() == 12 * 16
    assert model.training  # the previous mode is restored


def test_evaluate_max_images_across_batches():
    batch = (torch.zeros(2, 3, 8, 8), torch.ones(2, 2, 2, dtype=torch.long))

    class Loader(list):
        dataset = [0] * 6

    model = _Fixed().eval()
    conf = evaluate(model, Loader([batch] * 3), "cpu", 3, progress=False, max_images=3)
    assert conf.sum() == 3 * 4 and not model.training  # 2 images + 1 of the second batch
