"""DeepLabV2: a dilated ResNet (output stride 8) and the ASPP classifier whose branches are summed.

Taught in notebooks/04_joint_training.ipynb (and used by every notebook that trains).

- Backbones: torchvision ``resnet101`` (the paper), ``resnet50``, ``resnet34``, ``resnet18`` and a
  narrow ``tiny`` ResNet for CPU presets. Stages 3 and 4 trade their stride for dilation 2 and 4
  (ResNet-18..101: the first 3x3 conv of a dilated stage at half that, as mmseg's
  ``contract_dilation``), so the stage-4 map is H/8 x W/8 (ceil when H, W are not multiples of 8).
- Deviation (docs/deviations.md row 1): torchvision's ResNet (7x7 stem) instead of mmseg's
  ResNetV1c (three 3x3 stem convolutions) used by the official code; ImageNet weights come from
  torchvision.
- Classifier (docs/method.md §2): one 3x3 convolution per dilation (padding = dilation),
  outputs **summed**, weights N(0, 0.01), bias 0. ``aspp_dilations=(6, 12)`` is the "reduced" head most UDA papers use:
  the early DeepLab-v2 PyTorch code that AdaptSegNet published returned from inside the ASPP loop
  after the second branch, later works kept it (DAFormer calls it ``deeplabv2red``); CONFETI's
  configs use all four branches.

Shape: x (B, 3, H, W) -> logits (B, C, H/8, W/8), feats (B, F, H/8, W/8).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
BACKBONES = (*TORCHVISION_RESNETS, "tiny")


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (the ``tiny`` backbone's block).

    out = ReLU(BN(conv2(ReLU(BN(conv1(x))))) + shortcut(x)), shortcut = 1x1 conv-BN when the shape
    changes. Padding = dilation keeps the size of a 3x3 conv. Shape: (B, cin, H, W) -> (B, cout,
    H/stride, W/stride).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, dilation, dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    """A narrow ResNet with the same shape as the real one: stem /4, stage 2 /8, stages 3-4 dilated.

    Stem: 3x3 conv stride 2 + BN + ReLU + 3x3 max-pool stride 2 (/4); stages of one BasicBlock
    each with widths w, 2w, 4w, 8w: stage 2 stride 2 (/8), stages 3 and 4 dilation 2 and 4.
    Shape: (B, 3, H, W) -> (B, 8w, H/8, W/8).
    """

    def __init__(self, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )  # fmt: skip
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.layer3 = BasicBlock(2 * width, 4 * width, dilation=2)
        self.layer4 = BasicBlock(4 * width, 8 * width, dilation=4)
        self.out_channels = 8 * width

    def forward(self, x):
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))


def _dilate_basic_stage(stage: nn.Sequential, dilation: int) -> None:
    """Make a strided BasicBlock stage dilated, in place (torchvision does it only for Bottlenecks).

    The stride-2 conv and shortcut get stride 1; the first block's first conv gets dilation d/2,
    every other 3x3 conv d: the rule of torchvision's ``replace_stride_with_dilation`` for
    Bottlenecks and of mmseg's ``contract_dilation`` (docs/method.md §2), so all four ResNets
    dilate alike.
    Padding = dilation keeps each 3x3 conv size-preserving. Shape: unchanged (stays at H/8).
    """
    for i, block in enumerate(stage):
        d = dilation // 2 if i == 0 else dilation  # stage 3: 1 then 2; stage 4: 2 then 4
        block.conv1.stride = (1, 1)
        for conv, dil in ((block.conv1, d), (block.conv2, dilation)):
            conv.dilation, conv.padding = (dil, dil), (dil, dil)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without pooling/fc; layer3 and layer4 dilated (output stride 8).

    Stem = conv1 (7x7 stride 2) + bn1 + ReLU + max-pool stride 2; ``out_channels`` 2048 for
    Bottleneck ResNets (50/101), 512 for BasicBlock ones (18/34).
    Shape: (B, 3, H, W) -> (B, out_channels, H/8, W/8).
    """

    def __init__(self, name: str = "resnet101"):
        super().__init__()
        if name in ("resnet50", "resnet101"):
            net = getattr(torchvision.models, name)(
                weights=None, replace_stride_with_dilation=[False, True, True]
            )
            self.out_channels = 2048
        else:
            net = getattr(torchvision.models, name)(weights=None)
            _dilate_basic_stage(net.layer3, 2)
            _dilate_basic_stage(net.layer4, 4)
            self.out_channels = 512
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1, net.layer2, net.layer3, net.layer4,
        )  # fmt: skip

    def forward(self, x):
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))

    def load_torchvision_state(self, state: dict, source: str) -> None:
        """Load a torchvision ResNet state dict (``conv1.*``, ``layer1.*``...; ``fc.*`` ignored)."""
        renamed = {}
        for k, v in state.items():
            if k.startswith("fc."):
                continue
            head = k.split(".")[0]
            stem_idx = {"conv1": "stem.0", "bn1": "stem.1"}.get(head)
            renamed[(stem_idx + k[len(head) :]) if stem_idx else k] = v
        own = self.state_dict()
        missing = sorted(set(own) - set(renamed))
        unexpected = sorted(set(renamed) - set(own))
        bad = [k for k in own if k in renamed and renamed[k].shape != own[k].shape]
        if missing or unexpected or bad:
            raise ValueError(
                f"pretrained weights {source} do not fit this backbone: missing {missing[:8]}, "
                f"unexpected {unexpected[:8]}, shape mismatches {bad[:8]}"
            )
        self.load_state_dict(renamed)


def build_backbone(name: str, pretrained: str | None = None, width: int = 32) -> nn.Module:
    """``pretrained``: None (random init), "imagenet" (torchvision download), or a file path.

    "imagenet" takes torchvision's DEFAULT weights: IMAGENET1K_V2 for resnet50/101, IMAGENET1K_V1
    for resnet18/34 (the paper starts from mmseg's ``resnet101_v1c``, see the module docstring).
    A path is a torchvision-format state dict (``conv1.*``, ``bn1.*``, ``layerK.*``; ``fc.*``
    ignored; also accepted wrapped as ``{"state_dict": ...}``).
    Shape: the backbone maps (B, 3, H, W) -> (B, out_channels, H/8, W/8).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")
    if name == "tiny":
        if pretrained is not None:
            raise ValueError("the 'tiny' backbone has no pretrained weights; use pretrained=None")
        return TinyResNet(width)
    net = ResNetBackbone(name)
    if pretrained is None:
        return net
    if pretrained == "imagenet":
        weights = torchvision.models.get_model_weights(name).DEFAULT
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as e:  # offline, proxy, ...
            raise RuntimeError(
                f"could not fetch the ImageNet weights of {name} ({e}). Download them elsewhere "
                f"and pass pretrained='path/to/{name}.pth' (a torchvision state dict), or "
                "pretrained=None to train from random initialisation."
            ) from e
        net.load_torchvision_state(state, f"torchvision {weights}")
        return net
    path = Path(pretrained)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read pretrained weights {path}: {e}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"pretrained weights {path} hold a {type(state).__name__}, not a dict")
    net.load_torchvision_state(state, str(path))
    return net


class ASPPClassifier(nn.Module):
    """Sum of 3x3 convolutions with dilations d_i: logits = sum_i conv_{d_i}(feats) (DLV2 head).

    Each branch: 3x3, padding = dilation = d_i, bias, no norm/activation/dropout.
    Shape: (B, F, h, w) -> (B, C, h, w).
    """

    def __init__(self, in_channels: int, num_classes: int, dilations=(6, 12, 18, 24)):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d, bias=True)
            for d in dilations
        )
        for conv in self.branches:  # as in the official code: N(0, 0.01), bias 0
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, feats):
        return sum(conv(feats) for conv in self.branches)  # (B, C, H/8, W/8)


class DeepLabV2(nn.Module):
    """Dilated ResNet + ASPP classifier. ``forward`` returns (logits, stage-4 features).

    ``backbone``: "resnet101" (the paper), "resnet50", "resnet34", "resnet18" or "tiny" (``width``
    w sets its channels, feat_channels = 8w). ``aspp_dilations``: (6, 12, 18, 24) as CONFETI,
    (6, 12) the reduced head. ``pretrained``: None, "imagenet" or a path (see build_backbone).
    The auxiliary heads (CAM, projection) read ``feats``. Submodules ``backbone`` and ``head``
    are the two optimizer groups (head at 10x the learning rate).
    Shape: x (B, 3, H, W) -> logits (B, C, H/8, W/8), feats (B, feat_channels, H/8, W/8).
    """

    def __init__(
        self,
        num_classes: int = 19,
        backbone: str = "resnet101",
        aspp_dilations=(6, 12, 18, 24),
        pretrained: str | None = None,
        width: int = 32,
    ):
        super().__init__()
        self.backbone = build_backbone(backbone, pretrained, width)
        self.feat_channels = self.backbone.out_channels
        self.head = ASPPClassifier(self.feat_channels, num_classes, aspp_dilations)

    def forward(self, x):
        feats = self.backbone(x)  # (B, F, H/8, W/8)
        return self.head(feats), feats


def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits upsampled (bilinear, align_corners=False) to the input's size. Shape: (B, C, H, W)."""
    logits, _ = model(x)
    return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
