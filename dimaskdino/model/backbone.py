"""ResNet-18/34/50 backbone with torchvision's parameter names (a torchvision state dict loads
strictly, less the classifier), frozen BatchNorm, stride in the 3x3 conv (stride_in_1x1 False).
Returns res2..res5 (strides 4, 8, 16, 32)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

_LAYOUTS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine (all buffers, no parameters), the detectron2 /
    torchvision detection convention. Same state-dict keys as nn.BatchNorm2d."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # nn.BatchNorm2d also saves a step counter that has no meaning once the statistics are frozen.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype)[None, :, None, None] + shift.to(x.dtype)[None, :, None, None]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _norm_factory(norm: str) -> Callable[[int], nn.Module]:
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "group_norm":
        return lambda channels: nn.GroupNorm(32, channels)
    raise ValueError(f"backbone norm must be 'frozen_bn' or 'group_norm', got '{norm}'")


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, downsample: nn.Module | None, norm):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, planes, stride)
        self.bn1 = norm(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits in the 3x3 conv."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, downsample: nn.Module | None, norm):
        super().__init__()
        self.conv1 = _conv1x1(in_channels, planes)
        self.bn1 = norm(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = norm(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = norm(planes * self.expansion)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + identity)


class ResNet(nn.Module):
    """torchvision ResNet without avgpool/fc; forward returns {"res2": ..., "res5": ...}."""

    def __init__(self, depth: int = 50, norm: str = "frozen_bn", stem_channels: int = 64, base_width: int = 64):
        """stem_channels: the stem conv's output; base_width: the first stage's block width
        (doubled per stage; a bottleneck outputs 4x it). Both 64 in every published ResNet;
        smaller only for tiny test models (the authors'-code fixtures)."""
        super().__init__()
        if depth not in _LAYOUTS:
            raise ValueError(f"ResNet depth must be one of {sorted(_LAYOUTS)}, got {depth}")
        kind, blocks_per_stage = _LAYOUTS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        make_norm = _norm_factory(norm)
        self.depth, self.norm_kind = depth, norm

        self.conv1 = nn.Conv2d(3, stem_channels, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = make_norm(stem_channels)
        in_channels = stem_channels
        stages = []
        for stage_index, num_blocks in enumerate(blocks_per_stage):
            planes = base_width * 2**stage_index
            stride = 1 if stage_index == 0 else 2
            downsample = None
            if stride != 1 or in_channels != planes * block.expansion:
                downsample = nn.Sequential(
                    _conv1x1(in_channels, planes * block.expansion, stride), make_norm(planes * block.expansion)
                )
            blocks = [block(in_channels, planes, stride, downsample, make_norm)]
            in_channels = planes * block.expansion
            blocks += [block(in_channels, planes, 1, None, make_norm) for _ in range(num_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = {f"res{i + 2}": base_width * block.expansion * 2**i for i in range(4)}
        self.out_strides = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's init: He-normal (fan_out) convs, unit norms.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = F.relu(self.bn1(self.conv1(images)))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        res2 = self.layer1(x)
        res3 = self.layer2(res2)
        res4 = self.layer3(res3)
        res5 = self.layer4(res4)
        return {"res2": res2, "res3": res3, "res4": res4, "res5": res5}

    def load_torchvision_weights(self, path: str) -> None:
        """Load a torchvision resnet state dict saved with torch.save. Strict: every key but the
        classifier (fc.*, not part of a detector) must match, with the same shapes."""
        if self.norm_kind != "frozen_bn":
            raise ValueError(
                f"backbone weights ({path}) need model.backbone.norm='frozen_bn' (torchvision BatchNorm "
                f"statistics), but norm is '{self.norm_kind}'"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"backbone weights {path}: expected a state dict, got {type(state).__name__}")
        state = {key: value for key, value in state.items() if not key.startswith("fc.")}
        result = self.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"backbone weights {path} do not match a torchvision resnet{self.depth}: "
                f"missing keys {result.missing_keys[:8]}{'...' if len(result.missing_keys) > 8 else ''}, "
                f"unexpected keys {result.unexpected_keys[:8]}{'...' if len(result.unexpected_keys) > 8 else ''}"
            )


def build_backbone(depth: int, norm: str, weights: str = "", stem_channels: int = 64, base_width: int = 64) -> ResNet:
    backbone = ResNet(depth=depth, norm=norm, stem_channels=stem_channels, base_width=base_width)
    if weights:
        backbone.load_torchvision_weights(weights)
    return backbone
