"""Confusion matrix, per-class IoU and mIoU (19 / 16 / 13 classes), and the evaluation loop.

Taught in notebooks/01_data.ipynb and used by every run. The protocol (as DAFormer, spec §12):
whole-image inference at the training scale, logits upsampled bilinearly to the label size, the
**student** network evaluated, per-class IoU from intersection and union accumulated over the
whole split (not averaged per image), mIoU = mean over classes that occur (NaN-mean).

    IoU_k = TP_k / (TP_k + FP_k + FN_k)

Shape: pred, target (...) int -> confusion (C, C), rows = ground truth, columns = prediction.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .labels import CLASSES, IGNORE_INDEX, SYNTHIA13, SYNTHIA16


def confusion_matrix(pred, target, num_classes: int, ignore_index: int = IGNORE_INDEX):
    """Counts of (ground truth k, prediction j) over pixels whose target is a valid class.

    Predictions must be class indices in [0, C) (an argmax over C logits always is); anything
    else raises ValueError rather than being silently dropped.
    """
    pred = torch.as_tensor(pred).reshape(-1).long()
    target = torch.as_tensor(target).reshape(-1).long()
    if pred.shape != target.shape:
        raise ValueError(f"pred has {pred.numel()} pixels but target has {target.numel()}")
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    pred, target = pred[valid], target[valid]
    if len(pred) and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(
            f"predictions must lie in [0, {num_classes}), got {pred.min()}..{pred.max()}"
        )
    conf = torch.bincount(target * num_classes + pred, minlength=num_classes**2)
    return conf.view(num_classes, num_classes).cpu()


def iou(confusion: torch.Tensor) -> torch.Tensor:
    """Per-class IoU in [0, 1]; NaN where a class has neither ground truth nor prediction."""
    conf = confusion.double()
    tp = conf.diag()
    gt = conf.sum(1)  # TP + FN
    fp = conf.sum(0) - tp
    union = gt + fp
    return torch.where(
        union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan"))
    ).float()


def _mean_pct(values: torch.Tensor) -> float | None:
    v = values[~torch.isnan(values)]
    return round(float(v.mean()) * 100, 2) if len(v) else None


def summarize(confusion: torch.Tensor, class_names=CLASSES) -> dict:
    """``{"miou", "miou16", "miou13", "iou": {class: pct or None}, "num_classes"}`` in percent."""
    per = iou(confusion)
    c = len(per)
    out = {
        "miou": _mean_pct(per),
        "iou": {
            name: (None if torch.isnan(v) else round(float(v) * 100, 2))
            for name, v in zip(class_names, per)
        },
        "num_classes": c,
    }
    if c == len(CLASSES):
        out["miou16"] = _mean_pct(per[list(SYNTHIA16)])
        out["miou13"] = _mean_pct(per[list(SYNTHIA13)])
    return out


def format_table(summary: dict) -> str:
    """A per-class IoU table followed by the mIoU lines."""
    lines = [f"{'class':<15}{'IoU (%)':>9}", "-" * 24]
    for name, v in summary["iou"].items():
        lines.append(f"{name:<15}{'n/a' if v is None else f'{v:.2f}':>9}")
    lines.append("-" * 24)
    for key in ("miou", "miou16", "miou13"):
        if summary.get(key) is not None:
            lines.append(f"{key:<15}{summary[key]:>9.2f}")
    return "\n".join(lines)


@torch.no_grad()
def evaluate(
    model,
    loader,
    device,
    num_classes: int = 19,
    progress: bool = True,
    max_images: int | None = None,
) -> torch.Tensor:
    """Accumulate the confusion matrix of ``model`` over ``loader`` ((image, label) batches)."""
    was_training = model.training
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    seen = 0
    total = len(loader.dataset) if max_images is None else min(max_images, len(loader.dataset))
    bar = tqdm(total=total, desc="eval", disable=not progress, leave=False)
    try:
        for x, y in loader:
            if max_images is not None and seen >= max_images:
                break
            if max_images is not None:
                x, y = x[: max_images - seen], y[: max_images - seen]
            logits, _ = model(x.to(device))
            logits = F.interpolate(
                logits.float(), size=y.shape[-2:], mode="bilinear", align_corners=False
            )
            conf += confusion_matrix(logits.argmax(1).cpu(), y, num_classes)
            seen += len(x)
            bar.update(len(x))
    finally:
        bar.close()
        model.train(was_training)
    return conf


_ = np  # numpy users: np.asarray(confusion) works on the returned tensor
