"""Torch preprocessing (the GPU path's) against the CPU path's, on the CPU: same crop box, same
sample positions, same normalisation (see streamdet/preprocess_torch.py for the tolerances)."""

from __future__ import annotations

import contextlib

import cv2
import numpy as np
import pytest
import torch

from streamdet.preprocess import PreprocessContract, preprocess_frame
from streamdet.preprocess_torch import preprocess_tensor
from streamdet.sources.decoding import to_host_bgr, to_tensor_frame


def scene(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A (height, width, 3) BGR frame with detail at every scale: blurred noise."""
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (5, 5), 0)


def both(frame: np.ndarray, contract: PreprocessContract) -> tuple[np.ndarray, np.ndarray]:
    cpu = preprocess_frame(frame, contract)
    gpu_path = preprocess_tensor(to_tensor_frame(frame, torch.device("cpu")), contract)
    return cpu, gpu_path.numpy()


@pytest.mark.parametrize(
    "size", [(576, 768), (720, 1280), (1080, 1920)], ids=["576p", "720p", "1080p"]
)
@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_supersampled_frames_match_the_compiled_kernel_to_float_rounding(
    compiled_kernels, size: tuple[int, int], order: str
) -> None:
    """Frames of 240x320 and up read the very samples the CPU's compiled kernel reads."""
    contract = PreprocessContract(channel_order=order)  # type: ignore[arg-type]
    cpu, gpu_path = both(scene(*size), contract)
    assert np.abs(cpu - gpu_path).max() <= 1e-5


def test_supersampled_frames_match_the_opencv_route_to_its_uint8_rounding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without Numba the CPU path averages each 2x2 grid with OpenCV, rounding to uint8."""
    monkeypatch.setattr("streamdet.kernels.get", lambda: None)
    cpu, gpu_path = both(scene(1080, 1920), PreprocessContract())
    assert np.abs(cpu - gpu_path).max() <= 0.5 / 55.0 + 1e-5  # half a level over the least std


def test_an_8k_frame_averages_a_4x4_grid_like_the_cpu_path(compiled_kernels) -> None:
    cpu, gpu_path = both(scene(4320, 7680), PreprocessContract())
    assert np.abs(cpu - gpu_path).max() <= 0.02


@pytest.mark.parametrize("size", [(240, 320), (120, 160), (100, 100), (60, 80)])
def test_small_frames_are_resized_in_one_step_close_to_opencv(size: tuple[int, int]) -> None:
    """Regions under twice the crop: torch's area and bilinear filters against OpenCV's."""
    cpu, gpu_path = both(scene(*size), PreprocessContract())
    diff = np.abs(cpu - gpu_path)
    assert diff.mean() <= 0.1 and diff.max() <= 0.5


def test_it_writes_into_a_ring_slot_with_any_strides() -> None:
    store = torch.zeros((3, 10, 112, 112))
    slot = store[:, 4]  # (3, 112, 112), not contiguous
    frame = to_tensor_frame(scene(480, 640), torch.device("cpu"))
    result = preprocess_tensor(frame, out=slot)
    assert result is slot
    assert torch.equal(store[:, 4], preprocess_tensor(frame))
    assert not store[:, 3].any() and not store[:, 5].any()


@pytest.mark.parametrize(
    ("frame", "expect"),
    [
        (torch.zeros((48, 64, 3), dtype=torch.uint8), contextlib.nullcontext()),
        (np.zeros((48, 64, 3), np.uint8), pytest.raises(ValueError, match="torch.Tensor")),
        (torch.zeros((48, 64, 3)), pytest.raises(ValueError, match="uint8")),
        (torch.zeros((48, 64), dtype=torch.uint8), pytest.raises(ValueError, match=r"\(H, W, 3\)")),
        (torch.zeros((0, 64, 3), dtype=torch.uint8), pytest.raises(ValueError, match="empty")),
    ],
    ids=["ok", "numpy", "float", "gray", "empty"],
)
def test_bad_frames_are_refused_with_a_value_error(frame, expect) -> None:
    """Capture skips a frame its preprocessing refuses with a ValueError (and marks a gap)."""
    with expect:
        preprocess_tensor(frame)


def test_an_out_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match=r"out must be float32 with shape \(3, 112, 112\)"):
        preprocess_tensor(torch.zeros((48, 64, 3), dtype=torch.uint8), out=torch.zeros(3, 8, 8))


@pytest.mark.parametrize(
    "frame",
    [
        np.zeros((24, 32), np.uint8),
        np.zeros((24, 32, 4), np.uint8),
        np.zeros((24, 32, 1), np.uint8),
    ],
    ids=["gray", "bgra", "one-channel"],
)
def test_gray_and_bgra_frames_become_rgb_tensors_as_the_cpu_path_converts_them(frame) -> None:
    frame[5, 7] = 200
    tensor = to_tensor_frame(frame, torch.device("cpu"))
    assert tensor.shape == (24, 32, 3) and tensor.dtype == torch.uint8
    assert tensor[5, 7].tolist() == [200, 200, 200]


def test_host_bgr_round_trips_a_tensor_frame() -> None:
    frame = scene(24, 32)
    assert np.array_equal(to_host_bgr(to_tensor_frame(frame, torch.device("cpu"))), frame)
