import numpy as np
import torch

from confeti import labels as L


def test_classes_palette_and_ids():
    assert len(L.CLASSES) == 19 and L.CLASSES[0] == "road" and L.CLASSES[18] == "bicycle"
    assert L.PALETTE.shape == (19, 3) and tuple(L.PALETTE[0]) == (128, 64, 128)
    # label id 7 is road, 26 car, 33 bicycle; 0 unlabeled, -1 license plate, 34 unknown -> ignore
    ids = np.array([[7, 26, 33], [0, -1, 34]])
    out = L.id_to_train_id(ids)
    assert out.tolist() == [[0, 13, 18], [255, 255, 255]]
    assert L.id_to_train_id(torch.tensor(ids)).dtype == torch.int64


def test_every_label_id_maps_back():
    for k, lid in enumerate(L.LABEL_ID_OF_TRAIN_ID):
        assert L.id_to_train_id(np.array([lid]))[0] == k
    assert (L.id_to_train_id(np.arange(-1, 34)) != 255).sum() == 19


def test_synthia_subsets_and_map():
    assert len(L.SYNTHIA16) == 16 and len(L.SYNTHIA13) == 13
    assert 9 not in L.SYNTHIA16 and 3 not in L.SYNTHIA13
    assert L.synthia_to_train_id(np.array([3, 8, 0, 13])).tolist() == [0, 13, 255, 255]


# DAFormer's tools/convert_datasets/synthia.py, SYNTHIA class id -> Cityscapes train id
DAFORMER_SYNTHIA = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10,
                    10: 11, 17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18}  # fmt: skip


def test_synthia_table_is_daformers_whole():
    assert L.SYNTHIA_TO_TRAIN_ID == DAFORMER_SYNTHIA
    ids = np.arange(0, 300)
    want = [DAFORMER_SYNTHIA.get(int(i), 255) for i in ids]
    assert L.synthia_to_train_id(ids).tolist() == want
    # every train class is reachable; the 16-class subset leaves out terrain, truck, train
    assert sorted(DAFORMER_SYNTHIA.values()) == list(range(19))
    assert set(range(19)) - set(L.SYNTHIA16) == {9, 14, 16}


def test_colorize_and_resize_labels():
    rgb = L.colorize(np.array([[0, 255]]))
    assert rgb.shape == (1, 2, 3) and tuple(rgb[0, 0]) == (128, 64, 128) and rgb[0, 1].sum() == 0
    lab = torch.arange(16).view(1, 4, 4)
    assert L.resize_labels(lab, (2, 2)).tolist() == [[[0, 2], [8, 10]]]


def test_grid_survival_keeps_wide_classes_and_loses_a_one_pixel_pole():
    from confeti.labels import grid_survival

    y = torch.zeros(1, 16, 16, dtype=torch.long)  # road everywhere
    y[0, :, 8:] = 2  # building: the right half, cut exactly at a cell border
    y[0, :, 5] = 5  # a one-pixel pole, not on a sampled column of the 2x2 grid
    y[0, 3, 3] = 255  # ignored (not a sampled pixel): counts for no class
    kept, total = grid_survival(y, (2, 2))
    assert total[0] == 16 * 7 - 1 and total[2] == 16 * 8 and total[5] == 16
    assert kept[2] == total[2]  # building fills its cells
    assert kept[5] == 0  # the pole falls in cells sampled on road
    assert kept[0] == total[0]
    assert kept.sum() == total.sum() - 16  # only the pole's pixels are lost
