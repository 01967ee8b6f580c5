"""Dataset readers (GTA5, Cityscapes, SYNTHIA), joint transforms and rare-class sampling.

Taught in notebooks/01_data.ipynb.

Each reader pairs image and label files of an official folder layout, validates the pairing up
front from file headers only (``check``), and returns ImageNet-normalised images with Cityscapes
train ids. Randomness of the transforms comes from torch's RNG, so DataLoader worker seeding
makes it reproducible.

Shape: ``dataset[i]`` -> (image float32 (3, H, W), label int64 (H, W) in 0..18 or 255).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .labels import IGNORE_INDEX, NUM_CLASSES, id_to_train_id, synthia_to_train_id

# ImageNet statistics on the [0, 1] RGB scale; every image tensor in confeti is normalised so.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


_STATS: dict = {}  # (device, dtype) -> (mean, std): copied to a GPU once, not per call


def _mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    key = (x.device, x.dtype)
    if key not in _STATS:
        with torch.inference_mode(False):  # a plain constant, usable in any graph later
            _STATS[key] = tuple(
                torch.tensor(v, device=x.device, dtype=x.dtype).view(3, 1, 1)
                for v in (IMAGENET_MEAN, IMAGENET_STD)
            )
    return _STATS[key]


def normalize(img: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] -> ImageNet-normalised. Shape: (..., 3, H, W) -> same."""
    mean, std = _mean_std(img)
    return (img - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised -> RGB in [0, 1] (not clamped). Shape: (..., 3, H, W) -> same."""
    mean, std = _mean_std(x)
    return x * std + mean


class DatasetError(ValueError):
    """A dataset folder does not match its official layout (the message says what and where)."""


def read_png16(path) -> np.ndarray:
    """Read a 16-bit PNG exactly. Shape: -> (H, W) or (H, W, C) int32.

    Pillow opens 16-bit RGB(A) PNGs as 8-bit, keeping only the high byte. Its own decoder can
    still do the work: decoding the same file twice with the unpackers "RGB;16B" (high byte) and
    "RGB;16L" (which, on big-endian PNG data, picks the low byte) gives value = 256 * hi + lo.
    """
    with Image.open(path) as im:
        if im.mode.startswith("I"):  # single-channel 16-bit: Pillow reads it exactly
            return np.asarray(im, dtype=np.int32)
        tile = im.tile[0]
        if im.format != "PNG" or tile.args not in ("RGB;16B", "RGBA;16B"):
            return np.asarray(im.convert("RGB"), dtype=np.int32)  # an 8-bit file
    planes = []
    for rawmode in (tile.args, tile.args.replace("16B", "16L")):
        with Image.open(path) as im:
            im.tile = [tile._replace(args=rawmode)]
            planes.append(np.asarray(im, dtype=np.int32))
    return planes[0] * 256 + planes[1]


def _layout_error(msg: str, path, layout: str) -> DatasetError:
    return DatasetError(f"{msg}: {path}\nexpected layout:\n{layout}")


class _SegDataset(torch.utils.data.Dataset):
    """Pairs of (image, label) files, joint transforms, conversion to train ids."""

    LAYOUT = ""
    SPLITS = False  # whether ``split`` selects a sub-folder (Cityscapes) or is ignored
    LEGAL_IDS: frozenset[int] = frozenset(range(34))  # label ids a label file may hold

    @property
    def stats_path(self) -> Path:
        """Where ``RareClassSampler`` caches the per-image class pixel counts."""
        suffix = f"_{self.split}" if self.SPLITS else ""
        return self.root / f"sample_class_stats{suffix}.json"

    def __init__(self, root, split="train", resize=None, crop_size=None, flip=False,
                 cat_max_ratio=0.75, check=True, cache=False):  # fmt: skip
        self.root, self.split = Path(root), split
        self.resize = tuple(resize) if resize else None
        self.crop_size = tuple(crop_size) if crop_size else None
        self.flip, self.cat_max_ratio = flip, cat_max_ratio
        self.pairs = self._find_pairs()
        if check:
            self.check()
        # cache=True: keep each decoded, resized pair in memory after its first read, if the
        # whole split fits in CACHE_BYTES (ToyStreets: ~0.2 GB; GTA5 at 720x1280: never)
        self._cache = {} if cache and self.cache_bytes() <= CACHE_BYTES else None

    def cache_bytes(self) -> int:
        """Memory of every resized pair: float32 image (3, h, w) + uint8 label (h, w)."""
        h, w = self.image_size(0)
        return len(self.pairs) * h * w * (3 * 4 + 1)

    # -- subclasses: the file layout and the label decoding ---------------------------------
    def _find_pairs(self) -> list[tuple[Path, Path]]:
        raise NotImplementedError

    @staticmethod
    def read_label_ids(path: Path) -> np.ndarray:
        """The label file's raw ids, fully decoded. Shape: -> (H, W) integer."""
        raise NotImplementedError

    @staticmethod
    def to_train_id(ids: np.ndarray) -> np.ndarray:
        """Raw label ids -> train ids (0..18, 255). Shape: any -> same."""
        return id_to_train_id(ids)

    def _label_to_train_id(self, path: Path) -> np.ndarray:
        return self.to_train_id(self.read_label_ids(path))

    def _need_dir(self, path: Path) -> Path:
        if not path.is_dir():
            raise _layout_error("missing folder", path, self.LAYOUT)
        return path

    def _pair(self, images: dict, labels: dict, img_dir, lab_dir) -> list[tuple[Path, Path]]:
        """Match image and label files by key; any file without its partner is an error."""
        for key in sorted(set(images) ^ set(labels)):
            if key in images:
                raise _layout_error(f"image without label (looked in {lab_dir})", images[key], self.LAYOUT)  # fmt: skip
            raise _layout_error(f"label without image (looked in {img_dir})", labels[key], self.LAYOUT)  # fmt: skip
        if not images:
            raise _layout_error(f"empty split {self.split!r}: no images", img_dir, self.LAYOUT)
        return [(images[k], labels[k]) for k in sorted(images)]

    def check(self, progress: bool = True) -> None:
        """Validate every pair from the PNG headers only (sizes, readability); no decoding.

        The full decode of every file (truncation, label values) is ``datacheck.verify``."""
        bar = tqdm(self.pairs, desc=f"checking {self.root}", leave=False,
                   disable=not progress or len(self.pairs) < 2000)  # fmt: skip
        for img, lab in bar:
            sizes = []
            for path in (img, lab):
                try:
                    with Image.open(path) as im:
                        sizes.append(im.size)
                except Exception as e:  # noqa: BLE001 - any failure means an unreadable file
                    raise _layout_error(f"unreadable file ({e})", path, self.LAYOUT) from e
            if sizes[0] != sizes[1]:
                raise _layout_error(f"label size {sizes[1]} != image size {sizes[0]} of {img}", lab, self.LAYOUT)  # fmt: skip

    def __len__(self) -> int:
        return len(self.pairs)

    def image_size(self, i: int = 0) -> tuple[int, int]:
        """(H, W) of image ``i`` after the resize, read from the PNG header only."""
        with Image.open(self.pairs[i][0]) as im:
            w, h = im.size
        if self.resize is not None:  # keep ratio, fit into the (H, W) box
            scale = min(self.resize[0] / h, self.resize[1] / w)
            h, w = int(h * scale + 0.5), int(w * scale + 0.5)
        return h, w

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded pair ``i`` without transforms: RGB uint8 (H, W, 3), train ids uint8 (H, W)."""
        img_path, lab_path = self.pairs[i]
        try:
            with Image.open(img_path) as im:
                img = np.asarray(im.convert("RGB"))
        except Exception as e:  # noqa: BLE001
            raise _layout_error(f"corrupt image ({e})", img_path, self.LAYOUT) from e
        try:
            lab = self._label_to_train_id(lab_path)
        except Exception as e:  # noqa: BLE001
            raise _layout_error(f"corrupt label ({e})", lab_path, self.LAYOUT) from e
        if lab.shape != img.shape[:2]:
            raise _layout_error(f"label shape {lab.shape} != image shape {img.shape[:2]}", lab_path, self.LAYOUT)  # fmt: skip
        return img, lab

    def resized(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pair ``i`` decoded and resized, before the random transforms (from the cache if on).

        Shape: -> x float32 (3, h, w) in [0, 1], y int64 (h, w).
        """
        if self._cache is not None and i in self._cache:
            x, y8 = self._cache[i]
            return x, y8.long()  # 0..18 and 255 fit uint8 exactly
        img, lab = self.load(i)
        x = torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255.0  # (3, H, W)
        y = torch.from_numpy(lab.astype(np.int64))  # (H, W)
        x, y = resize_pair(x, y, self.resize)
        if self._cache is not None:
            self._cache[i] = (x, y.to(torch.uint8))
        return x, y

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.resized(i)
        return joint_transform(x, y, None, self.crop_size, self.flip, self.cat_max_ratio)


CACHE_BYTES = int(os.environ.get("CONFETI_DATA_CACHE_MB", "1024")) * 2**20  # per split


def resize_pair(x, y, resize=None):
    """Resize (keep ratio) into the ``resize`` box: bilinear image, nearest label.

    Shape: x (3, H, W), y (H, W) int64 -> x (3, h, w), y (h, w).
    """
    if resize is None:
        return x, y
    h, w = y.shape  # as mmseg's Resize(keep_ratio=True): the largest scale that fits
    scale = min(resize[0] / h, resize[1] / w)
    size = (int(h * scale + 0.5), int(w * scale + 0.5))
    x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
    y = F.interpolate(y[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return x, y


def joint_transform(x, y, resize=None, crop_size=None, flip=False, cat_max_ratio=0.75):
    """Resize (keep ratio, into the ``resize`` box), random crop, flip, pad; then normalise.

    Shape: x (3, H, W) in [0, 1], y (H, W) int64 -> x (3, h, w) normalised, y (h, w).
    """
    x, y = resize_pair(x, y, resize)
    if crop_size is not None:
        ch, cw = crop_size
        for _ in range(10):  # re-draw crops where one class covers > cat_max_ratio
            top = int(torch.randint(0, max(y.shape[0] - ch, 0) + 1, ()))
            left = int(torch.randint(0, max(y.shape[1] - cw, 0) + 1, ()))
            crop = y[top : top + ch, left : left + cw]
            if cat_max_ratio >= 1:
                break
            _, counts = torch.unique(crop[crop != IGNORE_INDEX], return_counts=True)
            if len(counts) > 1 and counts.max().item() / counts.sum().item() < cat_max_ratio:
                break  # as mmseg's RandomCrop: accept once no class dominates
        x, y = x[:, top : top + ch, left : left + cw], crop
    if flip and torch.rand(()) < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    x = normalize(x)
    if crop_size is not None and tuple(y.shape) != tuple(crop_size):  # pad image 0, label 255
        ph, pw = crop_size[0] - y.shape[0], crop_size[1] - y.shape[1]
        x = F.pad(x, (0, pw, 0, ph), value=0.0)
        y = F.pad(y, (0, pw, 0, ph), value=IGNORE_INDEX)
    return x.contiguous(), y.contiguous()


class GTA5Dataset(_SegDataset):
    """GTA5: ``images/*.png`` + ``labels/*.png`` (palette PNGs whose indices are label ids).

    ``split`` is ignored (GTA5 is used whole as the source).
    """

    LAYOUT = (
        "  ROOT/images/00001.png\n  ROOT/labels/00001.png  (palette PNG of Cityscapes label ids)"
    )

    def _find_pairs(self):
        img_dir = self._need_dir(self._need_dir(self.root) / "images")
        lab_dir = self._need_dir(self.root / "labels")
        images = {p.stem: p for p in img_dir.glob("*.png")}
        labels = {p.stem: p for p in lab_dir.glob("*.png")}
        return self._pair(images, labels, img_dir, lab_dir)

    @staticmethod
    def read_label_ids(path):
        with Image.open(path) as im:  # "P" (or "L"): the pixel values are the label ids
            if im.mode not in ("P", "L"):
                raise DatasetError(f"label mode {im.mode}, expected a palette or grayscale PNG of label ids")  # fmt: skip
            return np.asarray(im)


class CityscapesDataset(_SegDataset):
    """Cityscapes: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` + ``gtFine/.../*_gtFine_labelIds.png``."""

    LAYOUT = (
        "  ROOT/leftImg8bit/{split}/{city}/{name}_leftImg8bit.png\n"
        "  ROOT/gtFine/{split}/{city}/{name}_gtFine_labelIds.png"
    )
    SPLITS = True

    def _find_pairs(self):
        img_dir = self._need_dir(self._need_dir(self.root / "leftImg8bit") / self.split)
        lab_dir = self._need_dir(self._need_dir(self.root / "gtFine") / self.split)
        images = {
            str(p.relative_to(img_dir))[: -len("_leftImg8bit.png")]: p
            for p in img_dir.glob("*/*_leftImg8bit.png")
        }
        labels = {
            str(p.relative_to(lab_dir))[: -len("_gtFine_labelIds.png")]: p
            for p in lab_dir.glob("*/*_gtFine_labelIds.png")
        }
        return self._pair(images, labels, img_dir, lab_dir)

    @staticmethod
    def read_label_ids(path):
        with Image.open(path) as im:
            ids = np.asarray(im)
        if ids.ndim != 2:
            raise DatasetError(f"label has shape {ids.shape}, expected one channel of label ids")
        return ids


class SynthiaDataset(_SegDataset):
    """SYNTHIA RAND_CITYSCAPES: ``RGB/*.png`` + ``GT/LABELS/*.png``.

    The labels are 16-bit PNGs (RGB or RGBA); the class id (0..22) is the first channel, mapped
    to train ids with ``synthia_to_train_id`` (DAFormer's conversion: SYNTHIA's terrain, truck and
    train ids map to those train ids, and the 16-class evaluation drops them). ``split`` is ignored.
    """

    LEGAL_IDS = frozenset(range(23))

    LAYOUT = (
        "  ROOT/RGB/0000000.png\n  ROOT/GT/LABELS/0000000.png  (16-bit PNG, class id in channel 0)"
    )

    def _find_pairs(self):
        img_dir = self._need_dir(self._need_dir(self.root) / "RGB")
        lab_dir = self._need_dir(self._need_dir(self.root / "GT") / "LABELS")
        images = {p.stem: p for p in img_dir.glob("*.png")}
        labels = {p.stem: p for p in lab_dir.glob("*.png")}
        return self._pair(images, labels, img_dir, lab_dir)

    def check(self, progress: bool = True) -> None:
        """Also: every label must be a 16-bit PNG (bit depth read from the IHDR header)."""
        super().check(progress)
        for _, lab in self.pairs:
            depth = png_bit_depth(lab)
            if depth != 16:
                raise _layout_error(f"label has bit depth {depth}, expected a 16-bit PNG", lab, self.LAYOUT)  # fmt: skip

    @staticmethod
    def read_label_ids(path):
        depth = png_bit_depth(path)
        if depth != 16:
            raise DatasetError(f"label is {depth}-bit, expected a 16-bit PNG")
        raw = read_png16(path)
        return raw if raw.ndim == 2 else raw[..., 0]

    @staticmethod
    def to_train_id(ids):
        return synthia_to_train_id(ids)


def png_bit_depth(path) -> int:
    """Bits per sample from a PNG's IHDR chunk (byte 24 of the file), without decoding."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 25 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise DatasetError(f"{path}: not a PNG file")
    return head[24]


def class_pixel_counts(dataset: _SegDataset) -> list[dict[int, int]]:
    """Per image: {train id: pixel count} of the untransformed label (ignore excluded)."""
    stats = []
    for i in range(len(dataset)):
        lab = dataset._label_to_train_id(dataset.pairs[i][1])
        ids, counts = np.unique(lab[lab != IGNORE_INDEX], return_counts=True)
        stats.append({int(k): int(n) for k, n in zip(ids, counts)})
    return stats


def cached_class_stats(dataset: _SegDataset) -> list[dict[int, int]]:
    """``class_pixel_counts`` cached as JSON next to the data; recomputed if the files changed."""
    path = dataset.stats_path
    files = [str(lab.relative_to(dataset.root)) for _, lab in dataset.pairs]
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("files") == files:
            return [{int(k): v for k, v in d.items()} for d in cached["stats"]]
    stats = class_pixel_counts(dataset)
    try:  # atomically: a half-written file is never read by a second process
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"files": files, "stats": stats}))
        os.replace(tmp, path)
    except OSError:  # a read-only dataset folder: keep the stats in memory only
        pass
    return stats


class RareClassSampler(torch.utils.data.Sampler):
    """Rare-class sampling (DAFormer): first a class, then an image that contains it.

    P(c) = softmax_c((1 - f_c) / T) over the classes that some image holds with more than
    ``min_pixels`` pixels, f_c = that class's share of all (such) labelled pixels; then an image
    uniformly among those with > ``min_pixels`` pixels of c. Infinite unless ``num_samples``.
    """

    def __init__(self, dataset, temperature=0.01, min_pixels=3000, num_classes=NUM_CLASSES,
                 generator=None, num_samples=None):  # fmt: skip
        self.generator, self.num_samples = generator, num_samples
        stats = cached_class_stats(dataset)
        stats = [{c: n for c, n in d.items() if n > min_pixels and c < num_classes} for d in stats]
        totals = np.zeros(num_classes)
        for d in stats:
            for c, n in d.items():
                totals[c] += n
        if totals.sum() == 0:
            raise DatasetError(
                f"rare-class sampling: no image of {dataset.root} has a class with more than "
                f"min_pixels={min_pixels} pixels; lower rcs_min_pixels"
            )
        self.classes = [c for c in range(num_classes) if totals[c] > 0]
        freq = torch.tensor(totals[self.classes] / totals.sum())  # f_c
        self.class_probs = torch.softmax((1 - freq) / temperature, dim=0)  # P(c)
        self.class_freq = freq
        self.images_of = [[i for i, d in enumerate(stats) if c in d] for c in self.classes]

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError("an infinite RareClassSampler has no length; pass num_samples")
        return self.num_samples

    def sample(self, generator=None) -> int:
        """One image index: a class c ~ P(c), then an image holding c uniformly."""
        k = int(torch.multinomial(self.class_probs, 1, generator=generator))
        imgs = self.images_of[k]
        return imgs[int(torch.randint(len(imgs), (), generator=generator))]

    def __iter__(self):
        drawn = 0
        while self.num_samples is None or drawn < self.num_samples:
            yield self.sample(self.generator)
            drawn += 1
