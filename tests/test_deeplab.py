import pytest
import torch
import torchvision

from confeti.deeplab import DeepLabV2, build_backbone, predict


@pytest.mark.parametrize("backbone", ["tiny", "resnet18", "resnet50"])
def test_output_stride_8(backbone):
    m = DeepLabV2(num_classes=19, backbone=backbone, aspp_dilations=(1, 2), width=8).eval()
    logits, feats = m(torch.randn(1, 3, 64, 96))
    assert logits.shape == (1, 19, 8, 12)
    assert feats.shape == (1, m.feat_channels, 8, 12)
    assert predict(m, torch.randn(1, 3, 64, 96)).shape == (1, 19, 64, 96)


def test_resnet101_parameter_count_and_dilations():
    m = DeepLabV2(num_classes=19, backbone="resnet101")
    tv = torchvision.models.resnet101(weights=None)
    backbone = sum(p.numel() for n, p in tv.named_parameters() if not n.startswith("fc."))
    head = 4 * (2048 * 19 * 9 + 19)  # four 3x3 convs 2048 -> 19 with bias
    assert backbone == 42_500_160
    assert sum(p.numel() for p in m.parameters()) == backbone + head
    assert m.backbone.layer3[1].conv2.dilation == (2, 2)
    assert m.backbone.layer4[1].conv2.dilation == (4, 4)
    assert m.backbone.layer4[0].conv2.stride == (1, 1)


def test_basic_block_resnet_is_dilated():
    b = build_backbone("resnet18")
    assert b.layer3[0].conv1.stride == (1, 1) and b.layer3[1].conv1.dilation == (2, 2)
    assert b.layer4[1].conv2.dilation == (4, 4) and b.layer4[0].downsample[0].stride == (1, 1)


def test_reduced_head_is_the_sum_of_two_branches():
    m = DeepLabV2(num_classes=5, backbone="tiny", aspp_dilations=(6, 12), width=8).eval()
    assert len(m.head.branches) == 2
    assert [c.dilation for c in m.head.branches] == [(6, 6), (12, 12)]
    f = torch.randn(1, m.feat_channels, 16, 16)
    assert torch.allclose(m.head(f), m.head.branches[0](f) + m.head.branches[1](f))
    w = torch.cat([c.weight.flatten() for c in m.head.branches])
    assert 0.005 < w.std() < 0.015 and all((c.bias == 0).all() for c in m.head.branches)


def test_pretrained_from_a_local_file(tmp_path):
    tv = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(tv.state_dict(), path)
    b = build_backbone("resnet18", pretrained=str(path))
    assert torch.equal(b.stem[0].weight, tv.conv1.weight)
    assert torch.equal(b.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)


def test_bad_pretrained_files_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_backbone("resnet18", pretrained=str(tmp_path / "missing.pth"))
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="r34.pth"):
        build_backbone("resnet18", pretrained=str(path))
    with pytest.raises(ValueError, match="tiny"):
        build_backbone("tiny", pretrained="imagenet")
    with pytest.raises(ValueError, match="resnet101"):
        build_backbone("vgg16")
