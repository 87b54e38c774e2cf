"""C3D with BatchNorm (C3D_BN).

The C3D network of Tran et al., "Learning Spatiotemporal Features with 3D Convolutional
Networks" (ICCV 2015), with a BatchNorm3d after every convolution in place of dropout.
Layer names follow the original release so checkpoints load by name.

Example:
    >>> import torch
    >>> from streamdet.models.c3d import C3D_BN
    >>> model = C3D_BN(num_classes=8, width=0.125).eval()
    >>> model(torch.zeros(2, 3, 16, 112, 112)).shape
    torch.Size([2, 8])
"""

from __future__ import annotations

import copy

import torch
from torch import nn

CLIP_LENGTH = 16
CROP_SIZE = 112
INPUT_SHAPE = (3, CLIP_LENGTH, CROP_SIZE, CROP_SIZE)

# (name, output channels at width 1.0, pool after it: (name, kernel, padding) or None)
_CONV_LAYERS: tuple[
    tuple[str, int, tuple[str, tuple[int, int, int], tuple[int, int, int]] | None], ...
] = (
    ("conv1", 64, ("pool1", (1, 2, 2), (0, 0, 0))),
    ("conv2", 128, ("pool2", (2, 2, 2), (0, 0, 0))),
    ("conv3a", 256, None),
    ("conv3b", 256, ("pool3", (2, 2, 2), (0, 0, 0))),
    ("conv4a", 512, None),
    ("conv4b", 512, ("pool4", (2, 2, 2), (0, 0, 0))),
    ("conv5a", 512, None),
    ("conv5b", 512, ("pool5", (2, 2, 2), (0, 1, 1))),
)
_FC_WIDTH = 4096
# After pool5 a 16x112x112 clip is 1x4x4 per channel.
_POOL5_CELLS = 1 * 4 * 4


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class C3D_BN(nn.Module):  # noqa: N801 - the published name
    """C3D with a BatchNorm3d after every convolution.

    Args:
        num_classes: size of the fc8 output.
        width: multiplier for conv channels and fc6/fc7 (1.0 is the published network).
        dropout: dropout probability after fc6 and fc7 (0 by default: BN regularises instead).
    """

    def __init__(self, num_classes: int = 8, *, width: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, but got {num_classes}")
        if not 0.0 < width <= 4.0:
            raise ValueError(f"width must be in (0, 4], but got {width}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), but got {dropout}")
        self.num_classes = num_classes
        self.width = float(width)

        in_channels = 3
        for name, channels, pool in _CONV_LAYERS:
            out_channels = _scaled(channels, width)
            self.add_module(name, nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1))
            self.add_module(f"{name}_bn", nn.BatchNorm3d(out_channels))
            if pool is not None:
                pool_name, kernel, padding = pool
                self.add_module(pool_name, nn.MaxPool3d(kernel, stride=kernel, padding=padding))
            in_channels = out_channels

        fc_width = _scaled(_FC_WIDTH, width)
        self.flat_features = in_channels * _POOL5_CELLS
        self.fc6 = nn.Linear(self.flat_features, fc_width)
        self.fc7 = nn.Linear(fc_width, fc_width)
        self.fc8 = nn.Linear(fc_width, num_classes)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Conv trunk: (B, 3, 16, 112, 112) -> (B, C5, 1, 4, 4)."""
        for name, _, pool in _CONV_LAYERS:
            x = self.relu(getattr(self, f"{name}_bn")(getattr(self, name)(x)))
            if pool is not None:
                x = getattr(self, pool[0])(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or tuple(x.shape[1:]) != INPUT_SHAPE:
            raise ValueError(
                f"C3D_BN expects input of shape (B, {', '.join(map(str, INPUT_SHAPE))}), "
                f"but got {tuple(x.shape)}"
            )
        x = self.features(x)
        x = torch.flatten(x, 1)  # (B, C5, 1, 4, 4) -> (B, C5 * 16), per item: never mixes the batch
        x = self.dropout(self.relu(self.fc6(x)))
        x = self.dropout(self.relu(self.fc7(x)))
        return self.fc8(x)


def conv_names() -> list[str]:
    """Names of the convolution layers, input to output."""
    return [name for name, _, _ in _CONV_LAYERS]


@torch.no_grad()
def fuse_bn(model: C3D_BN) -> C3D_BN:
    """Return an inference copy of ``model`` with every BatchNorm folded into its convolution.

    The copy is in eval mode; its ``*_bn`` layers are ``nn.Identity``. The original is untouched.
    """
    fused = copy.deepcopy(model).eval()
    for name in conv_names():
        conv: nn.Conv3d = getattr(fused, name)
        bn = getattr(fused, f"{name}_bn")
        if not isinstance(bn, nn.BatchNorm3d):
            continue  # already fused
        assert bn.running_var is not None and bn.running_mean is not None
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = (bias - bn.running_mean) * scale + bn.bias
        conv.bias = nn.Parameter(new_bias)
        setattr(fused, f"{name}_bn", nn.Identity())
    return fused


def count_flops(model: C3D_BN) -> int:
    """Floating-point operations (2 per multiply-add) of conv and fc layers for one clip."""
    flops = 0
    t, h, w = CLIP_LENGTH, CROP_SIZE, CROP_SIZE
    for name, _, pool in _CONV_LAYERS:
        conv: nn.Conv3d = getattr(model, name)
        macs_per_out = conv.in_channels * 27
        flops += 2 * macs_per_out * conv.out_channels * t * h * w
        if pool is not None:
            pool_layer: nn.MaxPool3d = getattr(model, pool[0])
            k = pool_layer.kernel_size
            p = pool_layer.padding
            assert isinstance(k, tuple) and isinstance(p, tuple)
            t = (t + 2 * p[0] - k[0]) // k[0] + 1
            h = (h + 2 * p[1] - k[1]) // k[1] + 1
            w = (w + 2 * p[2] - k[2]) // k[2] + 1
    for fc in (model.fc6, model.fc7, model.fc8):
        flops += 2 * fc.in_features * fc.out_features
    return flops
