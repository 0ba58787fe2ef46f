"""resnet18, resnet50 and mobilenet_v3_small, written out in plain torch (random init).

torchvision's layer layout, reproduced so that the benchmark runs where torchvision is not
installed (its PyPI wheels need CUDA libraries). Same modules, same shapes, same parameter
counts as torchvision.models.resnet18(), resnet50() and mobilenet_v3_small().
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["resnet18", "resnet50", "mobilenet_v3_small", "export"]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet-50 block (stride on the 3x3 conv, "ResNet v1.5")."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet: `block` BasicBlock (expansion 1) or Bottleneck (4), `depths`
    blocks per stage."""

    def __init__(self, block: type, depths: tuple[int, ...], expansion: int,
                 num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers = []
        cin = 64
        for width, blocks, stride in zip((64, 128, 256, 512), depths, (1, 2, 2, 2),
                                         strict=True):
            mods = [block(cin, width, stride)]
            mods += [block(width * expansion, width, 1) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*mods))
            cin = width * expansion
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * expansion, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _divisible(v: float, d: int = 8) -> int:
    new = max(d, int(v + d / 2) // d * d)
    return new + d if new < 0.9 * v else new


class SqueezeExcitation(nn.Module):
    def __init__(self, c: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, c, 1)
        self.relu = nn.ReLU()
        self.scale = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale(self.fc2(self.relu(self.fc1(self.avgpool(x)))))
        return s * x


def _cba(cin: int, cout: int, k: int, stride: int, groups: int, act: type | None
         ) -> nn.Sequential:
    mods: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups,
                                       bias=False), nn.BatchNorm2d(cout, eps=0.001, momentum=0.01)]
    if act is not None:
        mods.append(act())
    return nn.Sequential(*mods)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, k: int, exp: int, cout: int, se: bool, hs: bool,
                 stride: int) -> None:
        super().__init__()
        act = nn.Hardswish if hs else nn.ReLU
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(_cba(cin, exp, 1, 1, 1, act))
        layers.append(_cba(exp, exp, k, stride, exp, act))
        if se:
            layers.append(SqueezeExcitation(exp, _divisible(exp // 4)))
        layers.append(_cba(exp, cout, 1, 1, 1, None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return y + x if self.use_res else y


_SMALL = [
    (16, 3, 16, 16, True, False, 2), (16, 3, 72, 24, False, False, 2),
    (24, 3, 88, 24, False, False, 1), (24, 5, 96, 40, True, True, 2),
    (40, 5, 240, 40, True, True, 1), (40, 5, 240, 40, True, True, 1),
    (40, 5, 120, 48, True, True, 1), (48, 5, 144, 48, True, True, 1),
    (48, 5, 288, 96, True, True, 2), (96, 5, 576, 96, True, True, 1),
    (96, 5, 576, 96, True, True, 1),
]


class MobileNetV3Small(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [_cba(3, 16, 3, 2, 1, nn.Hardswish)]
        layers += [InvertedResidual(*cfg) for cfg in _SMALL]
        layers.append(_cba(96, 576, 1, 1, 1, nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(576, 1024), nn.Hardswish(),
                                        nn.Dropout(0.2), nn.Linear(1024, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _init(model: nn.Module, seed: int) -> nn.Module:
    """Random init with non-trivial BatchNorm statistics (as after training)."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return model.eval()


def resnet18(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _init(ResNet(BasicBlock, (2, 2, 2, 2), 1), seed)


def resnet50(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _init(ResNet(Bottleneck, (3, 4, 6, 3), 4), seed)


def mobilenet_v3_small(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _init(MobileNetV3Small(), seed)


def export(model: nn.Module, path: str, *, dynamo: bool, size: int = 224) -> None:
    x = torch.randn(1, 3, size, size)
    kwargs = dict(input_names=["input"], output_names=["logits"],
                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    if dynamo:
        torch.onnx.export(model, (x,), path, dynamo=True, opset_version=18,
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", max=64)}},
                          input_names=["input"], output_names=["logits"])
    else:
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=13, **kwargs)
