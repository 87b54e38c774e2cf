"""A tiny deterministic model and the real clip it was fitted on, for end-to-end tests.

The model is a C3D_BN at width 0.0625 whose BatchNorm statistics are calibrated on the clip and
whose fc8 is fitted (ridge regression on its input features) so that the clip's windows score
"walk" up and then down, then "run": a random model alone scores every window the same and
makes no events.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from assets import cut_clip, vtest_path
from torch import nn

from streamdet.models.c3d import C3D_BN
from streamdet.models.weights import Checkpoint, save_checkpoint
from streamdet.preprocess import DEFAULT_CONTRACT, preprocess_frame

CLASS_NAMES = ("none", "walk", "run")
CLIP_FRAMES = 100
# Wanted logit of "walk" (and minus that of "run") for each of the clip's 11 windows: a walk event
# over windows 2-6 whose peak rises, and run events before and after it.
TARGET = (-2.0, -1.0, 1.0, 1.5, 2.0, 2.5, 1.0, -1.0, -2.0, -1.5, 0.5)


def make_walk_clip(folder: Path) -> Path:
    """The first 100 frames of vtest.avi at 320x240, 10 fps (cached in ``folder``)."""
    path = folder / "walk.avi"
    if not path.exists():
        cut_clip(vtest_path(), path, start_frame=0, n_frames=CLIP_FRAMES, size=(320, 240))
    return path


def _windows_of(clip: Path, length: int = 16, stride: int = 8) -> torch.Tensor:
    cap = cv2.VideoCapture(str(clip), cv2.CAP_FFMPEG)
    frames = []
    while (result := cap.read())[0]:
        frames.append(preprocess_frame(result[1], DEFAULT_CONTRACT))
    cap.release()
    x = np.stack(frames, 1)  # T x (3, 112, 112) -> (3, T, 112, 112)
    starts = range(0, len(frames) - length + 1, stride)
    return torch.from_numpy(
        np.stack([x[:, s : s + length] for s in starts])
    )  # (N, 3, 16, 112, 112)


def make_tiny_weights(folder: Path, clip: Path) -> Path:
    """A deterministic 3-class C3D_BN checkpoint scoring the clip's windows as TARGET (cached)."""
    path = folder / "tiny.safetensors"
    if path.exists():
        return path
    windows = _windows_of(clip)
    assert len(windows) == len(TARGET)
    torch.manual_seed(0)
    model = C3D_BN(num_classes=3, width=0.0625)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.momentum = None  # running stats = plain average over the calibration pass
    with torch.no_grad():
        model.train()
        model(windows)
        model.eval()
        # fc8's input features: (N, 3, 16, 112, 112) -> (N, F)
        h = model.relu(model.fc7(model.relu(model.fc6(model.features(windows).flatten(1)))))
        mean = h.mean(0)
        centred = h - mean
        gram = centred @ centred.T  # (N, N)
        ridge = 1e-3 * gram.trace() / len(TARGET)
        coef = torch.linalg.solve(gram + ridge * torch.eye(len(TARGET)), torch.tensor(TARGET))
        weight = centred.T @ coef  # (F,): walk logit = (h - mean) . weight
        bias = -(mean @ weight)
        model.fc8.weight.copy_(torch.stack([torch.zeros_like(weight), weight, -weight]))
        model.fc8.bias.copy_(torch.stack([torch.zeros_like(bias), bias, -bias]))
    save_checkpoint(path, model, class_names=CLASS_NAMES)
    return path


def random_checkpoint() -> Checkpoint:
    """A seeded random 3-class C3D_BN at width 0.0625 (scores every window about the same)."""
    torch.manual_seed(0)
    model = C3D_BN(num_classes=3, width=0.0625).eval()
    return Checkpoint(model, CLASS_NAMES, DEFAULT_CONTRACT, "tiny-random", "-")


def randomise_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every BatchNorm random affine parameters and running statistics, far from identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm3d):
                n = bn.num_features
                bn.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                bn.running_var.copy_(torch.rand(n, generator=gen) * 2.5 + 0.2)
                bn.weight.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                bn.bias.copy_(torch.randn(n, generator=gen) * 0.5)
    return model
