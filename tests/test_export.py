"""Export to TorchScript / ONNX, checked against PyTorch on real windows."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from streamdet.cli import build_parser
from streamdet.data.synthetic import CLASSES, make_stream
from streamdet.errors import WeightsError
from streamdet.models.c3d import C3D_BN
from streamdet.models.weights import save_checkpoint


def run_cli(argv):
    """The handler's own result or exception, without main's error handling."""
    args = build_parser().parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny checkpoint whose BatchNorm statistics are not the identity, so fusing is exercised."""
    torch.manual_seed(0)
    model = C3D_BN(num_classes=len(CLASSES), width=0.0625)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(2, 3, 16, 112, 112) * 2 + 0.5)
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_checkpoint(path, model.eval(), class_names=CLASSES)
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    d = tmp_path_factory.mktemp("v")
    make_stream(d / "s.mp4", d / "s.json", seed=3, duration_s=7)
    return d / "s.mp4"


def test_torchscript_export_matches_pytorch_on_video_windows(weights, video, tmp_path, capsys):
    out = tmp_path / "model.pt"
    assert (
        run_cli(
            [
                "export",
                "--weights",
                str(weights),
                "--format",
                "torchscript",
                "--out",
                str(out),
                "--video",
                str(video),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "max abs diff" in printed and "torch.jit.load" in printed
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", DeprecationWarning
        )  # torch.jit is deprecated, still supported
        loaded = torch.jit.load(str(out))
    assert loaded(torch.zeros(3, 3, 16, 112, 112)).shape == (3, len(CLASSES))  # batch axis is free
    meta = json.loads((tmp_path / "model.pt.json").read_text())
    assert json.loads(meta["class_names"]) == list(CLASSES)


def test_onnx_export_runs_in_onnxruntime_within_tolerance(weights, video, tmp_path, capsys):
    for module in ("onnx", "onnxruntime"):  # both in the [dev] extra, so CI runs this test
        pytest.importorskip(module, reason=f"{module} is not installed: pip install -e '.[dev]'")
    out = tmp_path / "model.onnx"
    assert (
        run_cli(
            [
                "export",
                "--weights",
                str(weights),
                "--format",
                "onnx",
                "--out",
                str(out),
                "--video",
                str(video),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "onnxruntime" in printed
    diff = float(printed.split("max abs diff ")[1].split()[0])
    assert diff < 1e-3


def test_export_of_a_missing_checkpoint_is_a_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        run_cli(
            [
                "export",
                "--weights",
                str(tmp_path / "nope.safetensors"),
                "--format",
                "torchscript",
                "--out",
                str(tmp_path / "m.pt"),
            ]
        )


@pytest.mark.parametrize("where", ["a-folder", "under-a-file"])
def test_an_export_that_cannot_be_written_is_a_clear_error_before_any_work(
    weights, tmp_path, where
):
    from streamdet.export import ExportError

    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    out = tmp_path / "a-folder" if where == "a-folder" else tmp_path / "a-file" / "m.pt"
    with pytest.raises(ExportError, match="is a folder|cannot write there"):
        run_cli(["export", "--weights", str(weights), "--format", "torchscript", "--out", str(out)])
