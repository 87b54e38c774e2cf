"""Export a checkpoint to ONNX or TorchScript and check it against PyTorch on real windows.

The exported model takes ``(B, 3, 16, 112, 112)`` float32 clips prepared with the checkpoint's
preprocessing contract and returns ``(B, num_classes)`` logits; the batch axis is dynamic. BatchNorm
is folded into the convolutions first (``fuse=True``). The check runs windows of real frames
(the first windows of a video given by the caller, else of a short synthetic stream) through
PyTorch and through the exported file (onnxruntime for ONNX when it is installed) and reports
the largest absolute difference of the logits. Class names and the contract go into the ONNX
metadata and into a ``.json`` file next to a TorchScript file.

ONNX needs the optional ``onnx`` package (``pip install streamdet[export]`` also brings
onnxruntime for the check).

Example:
    >>> report = export_model("streamdet/demo/c3d_bn_demo.safetensors", "/tmp/m.pt", fmt="torchscript")  # doctest: +SKIP
    >>> report.max_abs_diff < 1e-3  # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from streamdet.data.datasets import frames_to_clip
from streamdet.errors import ConfigError, StreamdetError
from streamdet.models.c3d import CLIP_LENGTH, fuse_bn
from streamdet.models.weights import load_checkpoint
from streamdet.preprocess import PreprocessContract
from streamdet.windows import video_windows


class ExportError(StreamdetError):
    """The export failed or its output does not match PyTorch."""


@dataclass
class ExportReport:
    path: Path
    fmt: str
    checked_with: str
    windows: int
    max_abs_diff: float
    tolerance: float
    top1_agree: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def summary(self) -> str:
        return (
            f"wrote {self.path} ({self.fmt}); checked {self.windows} windows with {self.checked_with}: "
            f"max abs diff {self.max_abs_diff:.3g} (tolerance {self.tolerance:g}), top-1 agreement {self.top1_agree:.3f}"
        )


def check_windows(
    contract: PreprocessContract, video: str | os.PathLike[str] | None = None, count: int = 4
) -> torch.Tensor:
    """``count`` windows of real frames as model input (count, 3, 16, crop, crop).

    From ``video``: its first ``count`` windows side by side (rewound when it is shorter),
    sampled and preprocessed with ``contract`` as a run would. Without a video: a short
    synthetic stream.
    """
    if video is not None:
        return video_windows(video, count, stride=CLIP_LENGTH, contract=contract, loop=True)
    from streamdet.data.synthetic import iter_stream

    frames = [
        f
        for f, _ in iter_stream(
            12345, duration_s=CLIP_LENGTH * count / 10.0 + 0.1, gap_frames=(2, 6)
        )
    ]
    clips = [
        frames_to_clip(frames[i * CLIP_LENGTH : (i + 1) * CLIP_LENGTH], contract)
        for i in range(count)
    ]
    return torch.stack(clips)


def _export_torchscript(
    model: torch.nn.Module, example: torch.Tensor, out: Path
) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example[:1], check_trace=False)
        traced = torch.jit.freeze(
            torch.jit.script(traced) if not isinstance(traced, torch.jit.ScriptModule) else traced
        )
        torch.jit.save(traced, str(out))
        return torch.jit.load(str(out), map_location="cpu")


def _export_onnx(
    model: torch.nn.Module, example: torch.Tensor, out: Path, meta: dict[str, str]
) -> None:
    try:
        import onnx
    except ImportError as exc:
        raise ExportError(
            "ONNX export needs the 'onnx' package: pip install 'streamdet[export]'"
        ) from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example[:1],),
            str(out),
            input_names=["clips"],
            output_names=["logits"],
            dynamic_axes={"clips": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    proto = onnx.load(str(out))
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(out))


def _writable(out: Path) -> Path:
    """``out``, after checking that a file can be written there (its folder is made)."""
    if out.is_dir():
        raise ExportError(f"{out}: is a folder; give the path of the file to write")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"{out}: cannot write there ({exc.strerror or exc})") from exc
    if not os.access(out.parent, os.W_OK):
        raise ExportError(f"{out}: cannot write there (its folder is not writable)")
    return out


def export_model(
    weights: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    fmt: str,
    video: str | os.PathLike[str] | None = None,
    tolerance: float = 1e-3,
    fuse: bool = True,
    windows: int = 4,
) -> ExportReport:
    """Export ``weights`` to ``out`` as ``fmt`` ('onnx' or 'torchscript') and check it.

    Raises:
        ConfigError: unknown format.
        ExportError: onnx missing, or the exported output differs from PyTorch by more than
            ``tolerance``.
        WeightsError: unreadable checkpoint.
    """
    if fmt not in ("onnx", "torchscript"):
        raise ConfigError(f"format must be 'onnx' or 'torchscript', but got {fmt!r}")
    ckpt = load_checkpoint(weights)
    model = fuse_bn(ckpt.model) if fuse else ckpt.model.eval()
    out = _writable(Path(out))
    x = check_windows(ckpt.contract, video, windows)
    with torch.no_grad():
        reference = ckpt.model.eval()(x).numpy()
    meta = {
        "class_names": json.dumps(list(ckpt.class_names)),
        "preprocess": json.dumps(ckpt.contract.to_dict()),
        "source_sha256": ckpt.sha256,
        "input": "clips: float32 (batch, 3, 16, 112, 112)",
    }
    if fmt == "torchscript":
        loaded = _export_torchscript(model, x, out)
        with torch.no_grad():
            got = loaded(x).numpy()
        out.with_suffix(out.suffix + ".json").write_text(json.dumps(meta, indent=1) + "\n")
        checked = "torch.jit.load"
    else:
        _export_onnx(model, x, out, meta)
        try:
            import onnxruntime as ort
        except ImportError:
            ort = None
        if ort is not None:
            session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            got = session.run(None, {"clips": x.numpy()})[0]
            checked = f"onnxruntime {ort.__version__}"
        else:  # the exported graph is at least well-formed; compare the (fused) PyTorch model
            import onnx

            onnx.checker.check_model(str(out))
            with torch.no_grad():
                got = model(x).numpy()
            checked = "onnx.checker + fused PyTorch (onnxruntime not installed)"
    diff = float(np.max(np.abs(got - reference)))
    agree = float(np.mean(got.argmax(1) == reference.argmax(1)))
    report = ExportReport(out, fmt, checked, int(x.shape[0]), diff, tolerance, agree)
    if not report.ok:
        raise ExportError(
            f"{out}: exported output differs from PyTorch: max abs diff {diff:.3g} > {tolerance:g}"
        )
    return report
