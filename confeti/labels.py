"""The 19 Cityscapes train classes, their palette and the label-id conversions.

Taught in notebooks/01_data.ipynb. The official Cityscapes label table comes from
``cityscapesscripts.helpers.labels``; SYNTHIA's own ids are mapped here as DAFormer's
SYNTHIA conversion script does (all 19 classes; SYNTHIA's terrain, truck and train are rare, and
the 16- and 13-class evaluations of SYNTHIA -> Cityscapes leave terrain, truck and train out).

Shape: every converter maps an integer array of any shape to an array of the same shape.
"""

from __future__ import annotations

import numpy as np
import torch
from cityscapesscripts.helpers.labels import labels as _CS_LABELS

IGNORE_INDEX = 255
NUM_CLASSES = 19

# train-id order: 0 road ... 18 bicycle (from the official table, trainId 0..18)
CLASSES: tuple[str, ...] = tuple(
    lab.name for lab in sorted(_CS_LABELS, key=lambda lab: lab.trainId) if 0 <= lab.trainId < 19
)
PALETTE: np.ndarray = np.array(
    [lab.color for lab in sorted(_CS_LABELS, key=lambda lab: lab.trainId) if 0 <= lab.trainId < 19],
    dtype=np.uint8,
)  # (19, 3)
# short names for axes, legends and tables (the full names are cut to "traffic", "traffic" by a
# plain [:7]); same train-id order as CLASSES
SHORT_NAMES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "t.light", "t.sign", "veget.",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "m.bike", "bicycle",
)  # fmt: skip

# Cityscapes label id (-1 .. 33) -> train id; everything not a train class -> 255.
_LUT_SIZE = 256
_CS_LUT = np.full(_LUT_SIZE, IGNORE_INDEX, dtype=np.uint8)
for _lab in _CS_LABELS:
    if 0 <= _lab.id < _LUT_SIZE and 0 <= _lab.trainId < NUM_CLASSES:
        _CS_LUT[_lab.id] = _lab.trainId
LABEL_ID_OF_TRAIN_ID: np.ndarray = np.array(
    [
        next(lab.id for lab in _CS_LABELS if lab.trainId == k and lab.id >= 0)
        for k in range(NUM_CLASSES)
    ],
    dtype=np.uint8,
)  # (19,) the Cityscapes label id written for each train id

# SYNTHIA (RAND_CITYSCAPES) class id -> Cityscapes train id, the table of DAFormer's
# tools/convert_datasets/synthia.py; ids not listed (0 void, 13 parking-slot, 14 road-work,
# 22 lane-marking) -> 255.
SYNTHIA_TO_TRAIN_ID: dict[int, int] = {
    3: 0,  # road
    4: 1,  # sidewalk
    2: 2,  # building
    21: 3,  # wall
    5: 4,  # fence
    7: 5,  # pole
    15: 6,  # traffic light
    9: 7,  # traffic sign
    6: 8,  # vegetation
    16: 9,  # terrain
    1: 10,  # sky
    10: 11,  # person
    17: 12,  # rider
    8: 13,  # car
    18: 14,  # truck
    19: 15,  # bus
    20: 16,  # train
    12: 17,  # motorcycle
    11: 18,  # bicycle
}
_SYN_LUT = np.full(65536, IGNORE_INDEX, dtype=np.uint8)
for _k, _v in SYNTHIA_TO_TRAIN_ID.items():
    _SYN_LUT[_k] = _v

# class subsets used for SYNTHIA -> Cityscapes (train ids)
SYNTHIA16: tuple[int, ...] = tuple(k for k in range(NUM_CLASSES) if k not in (9, 14, 16))
SYNTHIA13: tuple[int, ...] = tuple(k for k in SYNTHIA16 if k not in (3, 4, 5))
# "thing" classes of the ImageNet feature distance (DAFormer): light, sign, person ... bicycle
THING_CLASSES: tuple[int, ...] = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)


def _lookup(lut: np.ndarray, labels, offset: int = 0):
    """Apply a lookup table to an int array or tensor; out-of-range values map to IGNORE_INDEX."""
    is_tensor = isinstance(labels, torch.Tensor)
    arr = labels.cpu().numpy() if is_tensor else np.asarray(labels)
    if arr.dtype.kind not in "iub":
        raise TypeError(f"label ids must be integers, got dtype {arr.dtype}")
    idx = arr.astype(np.int64) + offset
    valid = (idx >= 0) & (idx < len(lut))
    out = np.full(arr.shape, IGNORE_INDEX, dtype=np.uint8)
    out[valid] = lut[idx[valid]]
    return torch.from_numpy(out).long() if is_tensor else out


def id_to_train_id(labels):
    """Cityscapes label ids (-1..33, as in ``*_gtFine_labelIds.png``) -> train ids (0..18, 255).

    Unknown values (negative, > 33) become IGNORE_INDEX. Accepts numpy arrays (returns uint8)
    and tensors (returns int64).
    """
    return _lookup(_CS_LUT, labels)


def synthia_to_train_id(labels):
    """SYNTHIA RAND_CITYSCAPES class ids -> Cityscapes train ids (0..18, 255)."""
    return _lookup(_SYN_LUT, labels)


def colorize(train_ids) -> np.ndarray:
    """Train-id map (H, W) -> RGB uint8 (H, W, 3) with the Cityscapes palette; ignore is black."""
    arr = train_ids.cpu().numpy() if isinstance(train_ids, torch.Tensor) else np.asarray(train_ids)
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:NUM_CLASSES] = PALETTE
    return lut[np.clip(arr, 0, 255).astype(np.uint8)]


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a label map, as the official code does for features.

    Shape: (B, H, W) long -> (B, h, w) long.
    """
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    out = torch.nn.functional.interpolate(labels[:, None].float(), size=size, mode="nearest")
    return out[:, 0].long()  # (B, h, w)


def grid_survival(labels: torch.Tensor, grid: tuple[int, int], num_classes: int = NUM_CLASSES):
    """How much of each class a coarse label grid keeps: the labels a loss on the feature grid
    sees (``resize_labels`` to ``grid``, nearest, as the pixel-to-prototype contrast does).

    A pixel of class c "survives" when the grid cell it falls in carries label c, i.e. when
    resize_labels(resize_labels(y, grid), (H, W))[p] == y[p] == c. Thin or small classes (poles,
    traffic lights, bicycles) survive least: their pixels mostly fall in cells sampled on a
    neighbour. Returns (kept, total): per class, the surviving pixels and all its pixels
    (ignored pixels count for no class).
    Shape: labels (B, H, W) long -> kept (C,), total (C,) int64.
    """
    back = resize_labels(resize_labels(labels, grid), tuple(labels.shape[-2:]))  # (B, H, W)
    valid = (labels >= 0) & (labels < num_classes)
    y = labels[valid]
    total = torch.bincount(y, minlength=num_classes)[:num_classes]
    kept = torch.bincount(y[back[valid] == y], minlength=num_classes)[:num_classes]
    return kept, total
