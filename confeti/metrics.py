"""Confusion matrix, per-class IoU and mIoU (19 / 16 / 13 classes), and the evaluation loop.

Taught in notebooks/01_data.ipynb and used by every run. The protocol (as DAFormer;
docs/method.md §11):
whole-image inference (no sliding window, single scale, no flip) at the training scale, logits
upsampled bilinearly (align_corners=False) to the label size, the **student** network evaluated
(not the EMA teacher), per-class IoU from intersection and union accumulated over the whole split
(not averaged per image), mIoU = mean over the classes whose IoU is defined (NaN-mean).

    IoU_k = TP_k / (TP_k + FP_k + FN_k),  TP_k = M[k, k], FN_k = sum_j M[k, j] - TP_k,
    FP_k = sum_i M[i, k] - TP_k  (M = confusion matrix, rows ground truth, columns prediction)

SYNTHIA -> Cityscapes reports mIoU16 (without terrain, truck, train) and mIoU13 (also without
wall, fence, pole): ``confeti.labels.SYNTHIA16`` / ``SYNTHIA13``.

Shape: pred, target (...) int -> confusion (C, C), rows = ground truth, columns = prediction.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .labels import CLASSES, IGNORE_INDEX, SYNTHIA13, SYNTHIA16


def confusion_matrix(pred, target, num_classes: int, ignore_index: int = IGNORE_INDEX):
    """Counts of (ground truth k, prediction j) over pixels whose target is a valid class.

    M[k, j] = #{pixels with target k and prediction j}, a bincount of target * C + pred over the
    pixels whose target is in [0, C) (``ignore_index`` and any other value count nowhere).
    Predictions on those pixels must be class indices in [0, C) (an argmax over C logits always
    is); anything else raises ValueError, so a model/num_classes mismatch is not silently scored
    (predictions on ignored pixels are not checked).
    Shape: pred, target (...) with the same number of elements -> (C, C) int64 on the CPU.
    """
    pred = torch.as_tensor(pred).reshape(-1).long()
    target = torch.as_tensor(target).reshape(-1).long().to(pred.device)
    if pred.shape != target.shape:
        raise ValueError(f"pred has {pred.numel()} pixels but target has {target.numel()}")
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    pred, target = pred[valid], target[valid]
    if len(pred) and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(
            f"predictions must lie in [0, {num_classes}), got {pred.min()}..{pred.max()}"
        )
    conf = torch.bincount(target * num_classes + pred, minlength=num_classes**2)  # (C*C,)
    return conf.view(num_classes, num_classes).cpu()  # (C, C): [gt, pred]


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
    """``{"miou", "miou16", "miou13", "iou": {class: pct or None}, "num_classes"}`` in percent.

    Percentages are rounded to 2 decimals; a class with no ground truth and no prediction has
    IoU None and is left out of the means (a mean over no class is None). miou16 / miou13 are the
    SYNTHIA subsets, defined only for the 19 Cityscapes classes (None otherwise).
    """
    per = iou(confusion)  # (C,)
    c = len(per)
    if len(class_names) < c:
        raise ValueError(f"{c} classes but only {len(class_names)} class names")
    out = {
        "miou": _mean_pct(per),
        "miou16": _mean_pct(per[list(SYNTHIA16)]) if c == len(CLASSES) else None,
        "miou13": _mean_pct(per[list(SYNTHIA13)]) if c == len(CLASSES) else None,
        "iou": {
            name: (None if torch.isnan(v) else round(float(v) * 100, 2))
            for name, v in zip(class_names[:c], per)
        },
        "num_classes": c,
    }
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
    autocast=None,
) -> torch.Tensor:
    """Accumulate the confusion matrix of ``model`` over ``loader`` ((image, label) batches).

    ``autocast``: a context for the forward pass (e.g. bf16 on a GPU); the logits are upsampled
    and compared in fp32.

    ``model(x)`` returns (logits, feats); the model is put in eval mode and its previous mode is
    restored afterwards. ``max_images`` stops after that many images (a quick look at a split).
    Shape: image (B, 3, H, W), label (B, H_l, W_l) -> confusion (C, C) int64 on the CPU.
    """
    was_training = model.training
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    seen = 0
    n = len(loader.dataset) if hasattr(loader, "dataset") else None
    total = n if max_images is None else min(max_images, n or max_images)
    bar = tqdm(total=total, desc="eval", disable=not progress, leave=False)
    try:
        for x, y in loader:
            if max_images is not None and seen >= max_images:
                break
            if max_images is not None:
                x, y = x[: max_images - seen], y[: max_images - seen]
            with autocast if autocast is not None else contextlib.nullcontext():
                logits, _ = model(x.to(device, non_blocking=True))  # (B, C, h, w)
            logits = F.interpolate(
                logits.float(), size=y.shape[-2:], mode="bilinear", align_corners=False
            )  # (B, C, H_l, W_l)
            conf += confusion_matrix(logits.argmax(1), y.to(device), num_classes)
            seen += len(x)
            bar.update(len(x))
    finally:
        bar.close()
        model.train(was_training)
    return conf
