import pytest
import torch
import torchvision

from confeti.deeplab import DeepLabV2, build_backbone, predict


def _dilations(stage):
    """Dilations of the 3x3 convs of a stage, in forward order; checks stride 1, padding = d."""
    out = []
    for m in stage.modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3):
            assert m.stride == (1, 1) and m.padding == m.dilation
            out.append(m.dilation[0])
    for m in stage.modules():  # the shortcut convs lose their stride too
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1):
            assert m.stride == (1, 1)
    return out


@pytest.mark.parametrize(
    "backbone, channels", [("tiny", 64), ("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)]
)
def test_output_stride_8(backbone, channels):
    m = DeepLabV2(num_classes=19, backbone=backbone, aspp_dilations=(1, 2), width=8).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        logits, feats = m(x)
        up = predict(m, x)
    assert m.feat_channels == channels
    assert logits.shape == (1, 19, 8, 8) and feats.shape == (1, channels, 8, 8)
    assert up.shape == (1, 19, 64, 64)
    # bilinear, align_corners=False: the same as interpolating the logits ourselves
    ref = torch.nn.functional.interpolate(logits, (64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(up, ref, atol=1e-6)


def test_resnet101_parameter_count_dilations_and_stride():
    m = DeepLabV2(num_classes=19, backbone="resnet101").eval()
    tv = torchvision.models.resnet101(weights=None)
    backbone = sum(p.numel() for n, p in tv.named_parameters() if not n.startswith("fc."))
    assert backbone == 42_500_160  # torchvision ResNet-101 without its 2048 x 1000 fc
    head = 4 * (2048 * 19 * 9 + 19)  # four 3x3 convs 2048 -> 19 with bias = 1,400,908
    assert sum(p.numel() for p in m.backbone.parameters()) == backbone
    assert sum(p.numel() for p in m.parameters()) == backbone + head == 43_901_068
    assert [c.dilation for c in m.head.branches] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    # replace_stride_with_dilation: first block at the previous dilation, then 2 (stage 3), 4
    assert _dilations(m.backbone.layer3) == [1] + [2] * 22
    assert _dilations(m.backbone.layer4) == [2, 4, 4]
    with torch.no_grad():
        logits, feats = m(torch.randn(1, 3, 32, 32))
    assert logits.shape == (1, 19, 4, 4) and feats.shape == (1, 2048, 4, 4)


@pytest.mark.parametrize("name, blocks3, blocks4", [("resnet18", 2, 2), ("resnet34", 6, 3)])
def test_basic_block_resnets_are_dilated_like_bottlenecks(name, blocks3, blocks4):
    b = build_backbone(name)
    # two 3x3 convs per block; the first conv of the stage at half the dilation
    assert _dilations(b.layer3) == [1] + [2] * (2 * blocks3 - 1)
    assert _dilations(b.layer4) == [2] + [4] * (2 * blocks4 - 1)


def test_tiny_backbone_shape():
    b = build_backbone("tiny", width=4)
    assert b.stem[0].kernel_size == (3, 3) and b.stem[0].stride == (2, 2)
    assert [b.layer1.conv1.out_channels, b.layer2.conv1.out_channels] == [4, 8]
    assert b.layer2.conv1.stride == (2, 2) and b.out_channels == 32
    assert _dilations(b.layer3) == [2, 2] and _dilations(b.layer4) == [4, 4]
    assert b(torch.randn(2, 3, 16, 32)).shape == (2, 32, 2, 4)


def test_reduced_head_is_the_sum_of_two_branches():
    m = DeepLabV2(num_classes=5, backbone="tiny", aspp_dilations=(6, 12), width=8).eval()
    assert len(m.head.branches) == 2
    assert [c.dilation for c in m.head.branches] == [(6, 6), (12, 12)]
    assert [c.padding for c in m.head.branches] == [(6, 6), (12, 12)]
    f = torch.randn(1, m.feat_channels, 16, 16)
    assert torch.allclose(m.head(f), m.head.branches[0](f) + m.head.branches[1](f))


def test_aspp_init_is_normal_0_01_with_zero_bias():
    m = DeepLabV2(num_classes=19, backbone="tiny", width=8)  # 4 x 19 x 64 x 9 = 43,776 weights
    w = torch.cat([c.weight.flatten() for c in m.head.branches])
    assert abs(w.std().item() - 0.01) < 5e-4 and abs(w.mean().item()) < 5e-4
    assert all((c.bias == 0).all() for c in m.head.branches)


def test_pretrained_from_a_local_file(tmp_path):
    tv = torchvision.models.resnet18(weights=None)  # its state dict includes fc.*: ignored
    path = tmp_path / "r18.pth"
    torch.save(tv.state_dict(), path)
    m = DeepLabV2(backbone="resnet18", pretrained=str(path))
    assert torch.equal(m.backbone.stem[0].weight, tv.conv1.weight)
    assert torch.equal(m.backbone.stem[1].running_var, tv.bn1.running_var)
    assert torch.equal(m.backbone.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)
    wrapped = tmp_path / "wrapped.pth"  # {"state_dict": ...} as many checkpoints are saved
    torch.save({"state_dict": tv.state_dict()}, wrapped)
    b = build_backbone("resnet18", pretrained=str(wrapped))
    assert torch.equal(b.layer2[0].downsample[0].weight, tv.layer2[0].downsample[0].weight)


def test_bad_pretrained_files_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_backbone("resnet18", pretrained=str(tmp_path / "missing.pth"))
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match=r"r34\.pth.*layer1\.2"):  # r34 has 3 blocks in layer1
        build_backbone("resnet18", pretrained=str(path))
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        build_backbone("resnet18", pretrained=str(junk))
    with pytest.raises(ValueError, match="tiny"):
        DeepLabV2(backbone="tiny", pretrained="imagenet")
    with pytest.raises(ValueError, match="resnet101"):
        build_backbone("vgg16")


def test_imagenet_weights_offline_and_online(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match=r"could not fetch.*pretrained='path/to/resnet18\.pth'"):
        build_backbone("resnet18", pretrained="imagenet")

    tv = torchvision.models.resnet18(weights=None)
    monkeypatch.setattr(
        torchvision.models._api, "load_state_dict_from_url", lambda *a, **k: tv.state_dict()
    )
    b = build_backbone("resnet18", pretrained="imagenet")
    assert torch.equal(b.layer3[0].conv1.weight, tv.layer3[0].conv1.weight)
