"""Dataset readers: official layouts, exact train ids, transforms, errors, rare-class sampling."""

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from confeti.datasets import (
    CityscapesDataset,
    DatasetError,
    GTA5Dataset,
    RareClassSampler,
    SynthiaDataset,
    denormalize,
    read_png16,
)

H, W = 16, 32


def _rgb(seed):
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _label_ids():
    """Left half road (label id 7), right half sky (23); one column of id 0, one of car (26)."""
    ids = np.full((H, W), 7, np.uint8)
    ids[:, W // 2 :] = 23
    ids[:, 0] = 0  # unlabeled -> 255
    ids[:, 1] = 26  # car -> 13
    return ids


EXPECTED = np.where(_label_ids() == 7, 0, np.where(_label_ids() == 23, 10, 13))
EXPECTED[:, 0] = 255


def make_gta5(root, n=3, ids=None):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        Image.fromarray(_rgb(i)).save(root / "images" / f"{i:05d}.png")
        lab = Image.fromarray(_label_ids() if ids is None else ids[i], mode="P")
        lab.putpalette([0, 0, 0] * 256)
        lab.save(root / "labels" / f"{i:05d}.png")
    return root


def make_cityscapes(root, split="train", n=2):
    for i in range(n):
        name = f"aachen_{i:06d}_000019"
        img = root / "leftImg8bit" / split / "aachen" / f"{name}_leftImg8bit.png"
        lab = root / "gtFine" / split / "aachen" / f"{name}_gtFine_labelIds.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        lab.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_rgb(i)).save(img)
        Image.fromarray(_label_ids(), mode="L").save(lab)
    return root


def write_png16_rgb(path, arr, sub_filter=True):
    """A 16-bit RGB PNG written by hand (Pillow cannot), rows Sub-filtered (bpp = 6)."""
    h, w, _ = arr.shape
    rows = []
    for r in range(h):
        raw = np.frombuffer(arr[r].astype(">u2").tobytes(), np.uint8).astype(np.int64)
        if sub_filter:
            filt = (raw - np.concatenate([np.zeros(6, np.int64), raw[:-6]])) % 256
            rows.append(b"\x01" + filt.astype(np.uint8).tobytes())
        else:
            rows.append(b"\x00" + raw.astype(np.uint8).tobytes())

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    png = (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"".join(rows)))
    )
    path.write_bytes(png + chunk(b"IEND", b""))


def make_synthia(root, n=2):
    (root / "RGB").mkdir(parents=True)
    (root / "GT" / "LABELS").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(_rgb(i)).save(root / "RGB" / f"{i:07d}.png")
        cls = np.full((H, W), 3, np.int64)  # road
        cls[:, W // 2 :] = 1  # sky
        cls[:, 0] = 0  # void -> 255
        cls[:, 1] = 19  # bus -> 15
        cls[0, 2] = 300  # > 255: must not wrap onto a class
        inst = np.full((H, W), 1000 + i)  # instance ids in channel 1
        write_png16_rgb(root / "GT" / "LABELS" / f"{i:07d}.png", np.stack([cls, inst, cls], -1))
    return root


def test_read_png16_exact(tmp_path):
    arr = np.random.default_rng(0).integers(0, 65536, (5, 7, 3))
    for sub in (True, False):
        write_png16_rgb(tmp_path / "a.png", arr, sub_filter=sub)
        np.testing.assert_array_equal(read_png16(tmp_path / "a.png"), arr)


def test_gta5_exact_train_ids(tmp_path):
    ds = GTA5Dataset(make_gta5(tmp_path / "gta5"))
    assert len(ds) == 3
    x, y = ds[1]
    assert x.dtype == torch.float32 and x.shape == (3, H, W)
    assert y.dtype == torch.int64
    np.testing.assert_array_equal(y.numpy(), EXPECTED)
    img = denormalize(x).permute(1, 2, 0).numpy() * 255
    np.testing.assert_allclose(img, _rgb(1), atol=1e-3)


def test_cityscapes_exact_train_ids_and_split(tmp_path):
    root = make_cityscapes(tmp_path / "cs", "train", 2)
    make_cityscapes(root, "val", 1)
    assert len(CityscapesDataset(root, "train")) == 2
    ds = CityscapesDataset(root, "val")
    assert len(ds) == 1
    np.testing.assert_array_equal(ds[0][1].numpy(), EXPECTED)


def test_synthia_16bit_ids(tmp_path):
    ds = SynthiaDataset(make_synthia(tmp_path / "syn"))
    _, y = ds[0]
    want = np.where(np.arange(W) < W // 2, 0, 10)[None].repeat(H, 0)
    want[:, 0], want[:, 1], want[0, 2] = 255, 15, 255
    np.testing.assert_array_equal(y.numpy(), want)


def test_resize_keep_ratio_crop_flip_pad(tmp_path):
    root = make_gta5(tmp_path / "gta5")
    ds = GTA5Dataset(root, resize=(8, 100))  # keep ratio: limited by height -> 8 x 16
    x, y = ds[0]
    assert x.shape == (3, 8, 16) and y.shape == (8, 16)
    assert set(np.unique(y.numpy())) <= {0, 10, 13, 255}
    torch.manual_seed(0)
    ds = GTA5Dataset(root, crop_size=(8, 8), flip=True)
    for i in range(3):
        x, y = ds[i]
        assert x.shape == (3, 8, 8) and y.shape == (8, 8)
    ds = GTA5Dataset(root, crop_size=(20, 40))  # larger than the image: padded with 255
    x, y = ds[0]
    assert y.shape == (20, 40) and (y[H:] == 255).all() and (y[:, W:] == 255).all()
    assert (x[:, H:] == 0).all()


def test_cat_max_ratio_redraws_dominated_crops(tmp_path):
    ids = np.full((H, W), 7, np.uint8)
    ids[:, -4:] = 23  # only crops touching the right edge have two classes
    root = make_gta5(tmp_path / "gta5", n=1, ids=[ids])
    torch.manual_seed(0)
    strict = GTA5Dataset(root, crop_size=(8, 8), cat_max_ratio=0.75)
    loose = GTA5Dataset(root, crop_size=(8, 8), cat_max_ratio=1.0)
    mixed_strict = np.mean([len(torch.unique(strict[0][1])) > 1 for _ in range(40)])
    mixed_loose = np.mean([len(torch.unique(loose[0][1])) > 1 for _ in range(40)])
    assert mixed_strict > mixed_loose + 0.2


def test_transforms_follow_torch_seed(tmp_path):
    ds = GTA5Dataset(make_gta5(tmp_path / "gta5"), crop_size=(8, 8), flip=True)
    torch.manual_seed(3)
    a = [ds[0][0] for _ in range(4)]
    torch.manual_seed(3)
    b = [ds[0][0] for _ in range(4)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_missing_root_and_folders(tmp_path):
    with pytest.raises(DatasetError, match="missing folder.*nowhere"):
        GTA5Dataset(tmp_path / "nowhere")
    (tmp_path / "g" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match="labels"):
        GTA5Dataset(tmp_path / "g")
    root = make_cityscapes(tmp_path / "cs", "train", 1)
    with pytest.raises(DatasetError, match="val"):
        CityscapesDataset(root, "val")
    (tmp_path / "s" / "RGB").mkdir(parents=True)
    with pytest.raises(DatasetError, match="GT"):
        SynthiaDataset(tmp_path / "s")


def test_unpaired_empty_size_mismatch_unreadable(tmp_path):
    root = make_gta5(tmp_path / "a", n=2)
    (root / "labels" / "00001.png").unlink()
    with pytest.raises(DatasetError, match=r"image without label.*00001\.png"):
        GTA5Dataset(root)
    root = make_gta5(tmp_path / "b", n=2)
    (root / "images" / "00000.png").unlink()
    with pytest.raises(DatasetError, match=r"label without image.*00000\.png"):
        GTA5Dataset(root)
    root = tmp_path / "c"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    with pytest.raises(DatasetError, match="empty split"):
        GTA5Dataset(root)
    root = make_gta5(tmp_path / "d", n=2)
    Image.fromarray(np.zeros((H, W + 1), np.uint8), mode="P").save(root / "labels" / "00001.png")
    with pytest.raises(DatasetError, match=r"size.*00001\.png"):
        GTA5Dataset(root)
    root = make_gta5(tmp_path / "e", n=2)
    (root / "images" / "00001.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"unreadable.*images.00001\.png"):
        GTA5Dataset(root)


def test_corrupt_file_found_while_loading(tmp_path):
    root = make_gta5(tmp_path / "gta5", n=2)
    ds = GTA5Dataset(root)
    good = (root / "images" / "00001.png").read_bytes()
    (root / "images" / "00001.png").write_bytes(good[:60])  # header intact, data truncated
    with pytest.raises(DatasetError, match=r"00001\.png"):
        ds[1]


def test_rare_class_sampler(tmp_path):
    common = np.full((H, W), 7, np.uint8)  # road only
    rare = common.copy()
    rare[:, :4] = 26  # car: 64 pixels in one image of four
    root = make_gta5(tmp_path / "gta5", n=4, ids=[common, common, common, rare])
    ds = GTA5Dataset(root)
    sampler = RareClassSampler(ds, temperature=0.1, min_pixels=10, num_samples=200,
                               generator=torch.Generator().manual_seed(0))  # fmt: skip
    cache = json.loads((root / "sample_class_stats.json").read_text())
    assert cache["stats"][3] == {"0": 512 - 64, "13": 64}
    assert sampler.classes == [0, 13]
    probs = sampler.class_probs
    assert abs(float(probs.sum()) - 1) < 1e-6 and probs[1] > probs[0]
    # hand-computed: f = (1984/2048, 64/2048); P(car) = 1 / (1 + exp((f_car - f_road) / T))
    f_road, f_car = 1984 / 2048, 64 / 2048
    assert abs(float(probs[1]) - 1 / (1 + np.exp((f_car - f_road) / 0.1))) < 1e-6
    draws = list(sampler)
    assert len(draws) == 200 and np.mean(np.array(draws) == 3) > 0.9  # uniform would be 0.25
    # the cache is reused, and recomputed when the file list changes
    (root / "sample_class_stats.json").write_text(json.dumps({"files": cache["files"], "stats": [{}, {}, {}, {"0": 512}]}))  # fmt: skip
    assert RareClassSampler(ds, min_pixels=10).classes == [0]
    (root / "images" / "00000.png").unlink()
    (root / "labels" / "00000.png").unlink()
    assert RareClassSampler(GTA5Dataset(root), min_pixels=10).classes == [0, 13]


def test_synthia_label_of_the_wrong_bit_depth_is_refused(tmp_path):
    root = make_synthia(tmp_path / "syn")
    lab = sorted((root / "GT" / "LABELS").glob("*.png"))[0]
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(lab)  # an 8-bit RGB PNG
    with pytest.raises(DatasetError, match=r"bit depth 8, expected a 16-bit PNG"):
        SynthiaDataset(root)


def test_cache_gives_the_items_of_a_fresh_read(toy, monkeypatch):
    """The in-memory cache of resized pairs (a speed change) returns, for every seed, exactly
    what decoding the files again returns, also on the second read, and never lets a caller's
    tensor alias its entries."""
    from confeti import datasets
    from confeti.runner import _Seeded

    kw = dict(resize=(32, 64), crop_size=(32, 48), flip=True)
    cached = _Seeded(GTA5Dataset(toy / "gta5", cache=True, **kw))
    fresh = _Seeded(GTA5Dataset(toy / "gta5", cache=False, **kw))
    assert cached.base._cache == {} and fresh.base._cache is None
    for rnd in range(2):  # round 1 fills the cache, round 2 reads from it
        for i in range(len(fresh)):
            (xa, ya), (xb, yb) = cached[(i, 100 * rnd + i)], fresh[(i, 100 * rnd + i)]
            assert torch.equal(xa, xb) and torch.equal(ya, yb) and ya.dtype == torch.int64
            xa.zero_()
            ya.fill_(0)  # a caller that writes into its batch must not change the cache
    assert len(cached.base._cache) == len(fresh)
    again = cached[(0, 0)]
    assert torch.equal(again[0], fresh[(0, 0)][0]) and torch.equal(again[1], fresh[(0, 0)][1])
    monkeypatch.setattr(datasets, "CACHE_BYTES", 0)  # a split larger than the budget: no cache
    assert GTA5Dataset(toy / "gta5", cache=True, **kw)._cache is None


def test_seeded_item_equals_torch_manual_seed(toy):
    """_Seeded seeds the CPU generator only; the crops and flips are those of torch.manual_seed."""
    from confeti.runner import _Seeded

    ds = GTA5Dataset(toy / "gta5", resize=(32, 64), crop_size=(32, 48), flip=True)
    for seed in range(6):
        torch.manual_seed(seed)
        x0, y0 = ds[seed % len(ds)]
        x1, y1 = _Seeded(ds)[(seed % len(ds), seed)]
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
