"""First look at NVDEC on a lent GPU, before anything is timed: does PyNvVideoCodec decode a
small H.264 file through NvdecSource, and what do its frames look like?

    python benchmarks/gpu_nvdec_probe.py

Prints PyNvVideoCodec's version, then per frame of a 640x480 clip written here with PyAV: the
tensor's shape, dtype and device, and how far its preprocessed form is from PyAV's (mean and
max, normalised units). Where anything fails it prints the traceback and the parts of the
module's API the source relies on (CreateDecoder's documentation, PacketData's attributes,
OutputColorType's members), so that one call tells what to change.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_pipeline import write_stream  # noqa: E402

from streamdet.preprocess import preprocess_frame  # noqa: E402
from streamdet.preprocess_torch import preprocess_tensor  # noqa: E402
from streamdet.sources.pyav import PyAVSource  # noqa: E402


def api_notes() -> None:
    try:
        nvc = importlib.import_module("PyNvVideoCodec")
    except Exception:
        traceback.print_exc()
        return
    print("# PyNvVideoCodec", getattr(nvc, "__version__", "?"))
    print("# CreateDecoder:", (getattr(nvc, "CreateDecoder", None).__doc__ or "")[:1500])
    packet = nvc.PacketData()
    print("# PacketData:", [a for a in dir(packet) if not a.startswith("_")])
    print("# OutputColorType:", [a for a in dir(nvc.OutputColorType) if not a.startswith("_")])


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to probe")
        return 1
    from streamdet.sources.nvdec import NvdecSource

    folder = Path(tempfile.mkdtemp())
    video = write_stream(folder / "probe.mp4", 640, 480, 1.0)
    try:
        t0 = time.perf_counter()
        source = NvdecSource(str(video), device=torch.device("cuda"))
        print(f"# opened in {(time.perf_counter() - t0) * 1e3:.0f} ms")
        reference = PyAVSource(str(video))
        for i in range(30):
            frame, expected = source.read(), reference.read()
            if frame is None or expected is None:
                print(f"frame {i}: no frame from {'NVDEC' if frame is None else 'PyAV'}")
                api_notes()
                return 1
            diff = np.abs(preprocess_tensor(frame).cpu().numpy() - preprocess_frame(expected))
            if i < 3 or i == 29:
                print(
                    f"frame {i}: {tuple(frame.shape)} {frame.dtype} {frame.device} "
                    f"stride {frame.stride()}; vs PyAV mean {diff.mean():.4f} max {diff.max():.3f}"
                )
        source.release()
        reference.release()
        return 0
    except Exception:
        traceback.print_exc()
        api_notes()
        return 1
    finally:
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()


if __name__ == "__main__":
    raise SystemExit(main())
