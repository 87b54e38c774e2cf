"""Checkpoints: safetensors with metadata, safe PyTorch state dicts, Sports-1M import, load errors."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_model import randomise_bn
from torch import nn

from streamdet.errors import WeightsError
from streamdet.models.c3d import C3D_BN, INPUT_SHAPE, conv_names
from streamdet.models.weights import (
    SPORTS1M_CLASSES,
    file_sha256,
    import_sports1m,
    load_checkpoint,
    load_or_random,
    save_checkpoint,
)
from streamdet.preprocess import DEFAULT_CONTRACT, PreprocessContract

SMALL = 0.0625
CLASSES = ("none", "fall", "fight")
CUSTOM_CONTRACT = PreprocessContract(
    channel_order="BGR", mean=(90.0, 100.0, 110.0), std=(50.0, 55.0, 60.0), fps=25.0, frame_step=2
)


@pytest.fixture(scope="module")
def model() -> C3D_BN:
    """A small trained-looking model: random weights and random BN statistics, eval mode."""
    torch.manual_seed(0)
    return randomise_bn(C3D_BN(num_classes=len(CLASSES), width=SMALL)).eval()


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    return torch.randn(1, *INPUT_SHAPE, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def logits(model: C3D_BN, clip: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(clip)


@pytest.fixture
def checkpoint_path(tmp_path: Path, model: C3D_BN) -> Path:
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, class_names=CLASSES)
    return path


def run(model: nn.Module, clip: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(clip)


# --- safetensors -------------------------------------------------------------------------------


def test_safetensors_round_trip_gives_identical_logits_and_metadata(
    tmp_path: Path, model: C3D_BN, clip: torch.Tensor, logits: torch.Tensor
) -> None:
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, class_names=CLASSES, contract=CUSTOM_CONTRACT, extra={"epoch": 3})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "c3d_bn"
    assert float(meta["width"]) == SMALL
    assert int(meta["num_classes"]) == len(CLASSES)
    assert json.loads(meta["class_names"]) == list(CLASSES)
    assert PreprocessContract.from_dict(json.loads(meta["preprocess"])) == CUSTOM_CONTRACT
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temp file

    ckpt = load_checkpoint(path)
    assert ckpt.class_names == CLASSES and ckpt.num_classes == len(CLASSES)
    assert ckpt.contract == CUSTOM_CONTRACT
    assert ckpt.model.width == SMALL and not ckpt.model.training
    assert ckpt.metadata == {"epoch": 3}
    assert ckpt.sha256 == file_sha256(path) and ckpt.name == path.name
    assert torch.equal(run(ckpt.model, clip), logits)


def test_fp16_checkpoint_stores_half_tensors_and_loads_as_float32(
    tmp_path: Path, model: C3D_BN, clip: torch.Tensor, logits: torch.Tensor
) -> None:
    full, half = tmp_path / "fp32.safetensors", tmp_path / "fp16.safetensors"
    save_checkpoint(full, model, class_names=CLASSES)
    save_checkpoint(half, model, class_names=CLASSES, dtype=torch.float16)
    stored = load_file(str(half))
    assert stored["fc6.weight"].dtype == torch.float16
    assert stored["conv1_bn.running_var"].dtype == torch.float16
    assert stored["conv1_bn.num_batches_tracked"].dtype == torch.int64  # integers are not cast
    assert half.stat().st_size < 0.6 * full.stat().st_size

    loaded = load_checkpoint(half).model
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(loaded.fc6.weight, model.fc6.weight.half().float())
    torch.testing.assert_close(
        run(loaded, clip), logits, rtol=2e-2, atol=2e-2 * float(logits.abs().max())
    )


def test_save_checkpoint_refuses_class_names_that_do_not_match_the_model(
    tmp_path: Path, model: C3D_BN
) -> None:
    with pytest.raises(ValueError, match="2 names, but the model has 3 classes"):
        save_checkpoint(tmp_path / "m.safetensors", model, class_names=["a", "b"])
    assert not list(tmp_path.iterdir())


# --- plain PyTorch state dicts -----------------------------------------------------------------


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 7},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
    ],
    ids=["plain", "nested-state_dict", "dataparallel-prefix"],
)
def test_plain_state_dict_loads_with_weights_only(
    tmp_path: Path,
    model: C3D_BN,
    clip: torch.Tensor,
    logits: torch.Tensor,
    wrap: Callable[[dict], Any],
) -> None:
    path = tmp_path / "model.pt"
    torch.save(wrap(model.state_dict()), path)
    ckpt = load_checkpoint(path, width=SMALL, class_names=CLASSES)
    assert ckpt.num_classes == len(CLASSES)  # read from fc8
    assert ckpt.class_names == CLASSES
    assert ckpt.contract == DEFAULT_CONTRACT  # a plain state dict carries none
    assert torch.equal(run(ckpt.model, clip), logits)


# --- load_or_random: the one way the runner, info and the benchmarks build a model ------------


def test_load_or_random_without_weights_builds_the_same_seeded_model_each_time() -> None:
    first = load_or_random(None, num_classes=3, width=SMALL)
    torch.manual_seed(123)  # whatever the caller drew before
    second = load_or_random(None, num_classes=3, width=SMALL)
    assert first.is_random and first.name == "random-init"
    assert first.class_names == ("class_0", "class_1", "class_2")
    assert first.contract == DEFAULT_CONTRACT and not first.model.training
    state = second.model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in first.model.state_dict().items())


def test_load_or_random_defaults_to_eight_classes_at_full_width() -> None:
    ckpt = load_or_random(None)
    assert (ckpt.num_classes, ckpt.model.width) == (8, 1.0)


def test_load_or_random_takes_a_safetensors_checkpoints_own_shape(
    checkpoint_path: Path, clip: torch.Tensor, logits: torch.Tensor
) -> None:
    ckpt = load_or_random(checkpoint_path, num_classes=8, width=1.0)  # as a config's defaults
    assert not ckpt.is_random and ckpt.sha256 == file_sha256(checkpoint_path)
    assert ckpt.class_names == CLASSES and ckpt.model.width == SMALL
    assert torch.equal(run(ckpt.model, clip), logits)


def test_load_or_random_describes_a_plain_state_dict_with_its_arguments(
    tmp_path: Path, model: C3D_BN, clip: torch.Tensor, logits: torch.Tensor
) -> None:
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    ckpt = load_or_random(path, width=SMALL)  # classes: fc8's rows
    assert ckpt.num_classes == len(CLASSES) and not ckpt.is_random
    assert torch.equal(run(ckpt.model, clip), logits)
    with pytest.raises(WeightsError, match="do not fit"):
        load_or_random(path, num_classes=8, width=SMALL)


class _TouchOnUnpickle:
    """Unpickling calls ``Path.touch(marker)``: a stand-in for any code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


class _ShellOnUnpickle:
    """Unpickling runs ``touch marker`` through ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch '{self.marker}'",))


def _torch_save(obj: object, path: Path) -> None:
    torch.save(obj, path)


def _torch_save_legacy(obj: object, path: Path) -> None:
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def _pickle_dump(obj: object, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.mark.parametrize(
    "payload", [_TouchOnUnpickle, _ShellOnUnpickle], ids=["Path.touch", "os.system"]
)
@pytest.mark.parametrize(
    "write",
    [_torch_save, _torch_save_legacy, _pickle_dump],
    ids=["torch.save", "torch.save-legacy", "pickle.dump"],
)
def test_crafted_pickle_is_refused_and_its_code_never_runs(
    tmp_path: Path, model: C3D_BN, payload: type, write: Callable[[object, Path], None]
) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    state = dict(model.state_dict())
    state["fc8.bias"] = payload(marker)  # hidden among real tensors
    write(state, path)

    with pytest.raises(WeightsError, match="refused") as raised:
        load_checkpoint(path, width=SMALL)
    assert "\n" not in str(raised.value)
    assert not marker.exists()

    # Control: the same file does run its code when unpickled without weights_only.
    if write is _pickle_dump:
        with open(path, "rb") as f:
            pickle.load(f)  # noqa: S301 - deliberately unsafe, on our own file
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


# --- Sports-1M import --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sports1m_state() -> dict[str, torch.Tensor]:
    """A state dict in the Sports-1M C3D layout: full-width conv/fc, no BN, 487-class fc8 (~310 MB)."""
    torch.manual_seed(1)
    source = C3D_BN(num_classes=SPORTS1M_CLASSES, width=1.0).state_dict()
    return {k: v for k, v in source.items() if "_bn" not in k}


def _plain_c3d_features(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The original C3D trunk (conv -> ReLU -> pool, no BN), written out with functional ops."""
    pools = {
        "conv1": ((1, 2, 2), (0, 0, 0)),
        "conv2": ((2, 2, 2), (0, 0, 0)),
        "conv3b": ((2, 2, 2), (0, 0, 0)),
        "conv4b": ((2, 2, 2), (0, 0, 0)),
        "conv5b": ((2, 2, 2), (0, 1, 1)),
    }
    for name in ("conv1", "conv2", "conv3a", "conv3b", "conv4a", "conv4b", "conv5a", "conv5b"):
        x = F.relu(F.conv3d(x, state[f"{name}.weight"], state[f"{name}.bias"], padding=1))
        if name in pools:
            kernel, padding = pools[name]
            x = F.max_pool3d(x, kernel, stride=kernel, padding=padding)
    return x


def test_import_sports1m_copies_weights_sets_bn_to_identity_and_reinitialises_fc8(
    sports1m_state: dict[str, torch.Tensor],
) -> None:
    rng_before = torch.get_rng_state()
    model = import_sports1m(sports1m_state, num_classes=5).eval()
    # Regression: the importer called torch.manual_seed, resetting the caller's random stream.
    assert torch.equal(torch.get_rng_state(), rng_before)

    target = model.state_dict()
    for name in [*conv_names(), "fc6", "fc7"]:
        for param in ("weight", "bias"):
            key = f"{name}.{param}"
            assert torch.equal(target[key], sports1m_state[key]), key
    assert (model.fc8.in_features, model.fc8.out_features) == (4096, 5)
    assert not torch.equal(model.fc8.weight, sports1m_state["fc8.weight"][:5])

    # Each BN passes its input through unchanged in eval mode ...
    gen = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        for name in conv_names():
            bn = getattr(model, f"{name}_bn")
            x = torch.randn(1, bn.num_features, 2, 3, 3, generator=gen) * 10
            torch.testing.assert_close(bn(x), x, rtol=1e-6, atol=1e-6)
        # ... so the trunk computes what the original BN-free C3D computes (small frames: cheap).
        x = torch.randn(1, 3, 16, 16, 16, generator=gen)
        expected = _plain_c3d_features(sports1m_state, x)
        actual = model.features(x)
    assert actual.shape == expected.shape and float(expected.abs().max()) > 0
    assert float((actual - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


def test_import_sports1m_reports_every_mismatched_key(
    tmp_path: Path, sports1m_state: dict[str, torch.Tensor]
) -> None:
    state = dict(sports1m_state)
    state["conv3a.weight"] = torch.zeros(128, 128, 3, 3, 3)
    state["fc6.weight"] = torch.zeros(4096, 4096)
    del state["conv5b.bias"]
    with pytest.raises(WeightsError) as raised:
        import_sports1m(state)
    message = str(raised.value)
    assert "\n" not in message
    assert "conv3a.weight: expected (256, 128, 3, 3, 3), got (128, 128, 3, 3, 3)" in message
    assert "fc6.weight: expected (4096, 8192), got (4096, 4096)" in message
    assert "conv5b.bias: missing" in message
    assert "conv1.weight" not in message  # only the problems are listed


def test_import_sports1m_from_a_file_names_the_file_and_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "c3d_partial.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3, 3), "conv1.bias": torch.zeros(64)}, path)
    with pytest.raises(
        WeightsError, match=r"c3d_partial\.pth: not a Sports-1M C3D state dict"
    ) as raised:
        import_sports1m(path)
    assert "conv2.weight: missing" in str(raised.value) and "fc7.bias: missing" in str(raised.value)


# --- load errors -------------------------------------------------------------------------------


def _rewrite_metadata(source: Path, dest: Path, **changes: str) -> None:
    with safe_open(str(source), framework="pt") as f:
        meta = dict(f.metadata())
    save_file(load_file(str(source)), str(dest), metadata={**meta, **changes})


def _truncate(source: Path, dest: Path) -> None:
    data = source.read_bytes()
    dest.write_bytes(data[: len(data) // 2])


def _state_dict_file(model: C3D_BN, dest: Path) -> None:
    torch.save(model.state_dict(), dest)


# id -> (file name, how to make it from a good checkpoint, load_checkpoint kwargs, expected text)
LOAD_ERRORS: dict[str, tuple[str, Callable[[Path, Path, C3D_BN], None], dict[str, Any], str]] = {
    "missing-file": ("nope.safetensors", lambda src, dst, m: None, {}, "not found"),
    "directory": ("dir.safetensors", lambda src, dst, m: dst.mkdir(), {}, "is a directory"),
    "truncated-safetensors": (
        "cut.safetensors",
        lambda src, dst, m: _truncate(src, dst),
        {},
        "not a readable safetensors file",
    ),
    "truncated-state-dict": (
        "cut.pt",
        lambda src, dst, m: (
            _state_dict_file(m, dst.with_suffix(".full")),
            _truncate(dst.with_suffix(".full"), dst),
        ),
        {"width": SMALL},
        "truncated",
    ),
    "empty-file": ("empty.pt", lambda src, dst, m: dst.write_bytes(b""), {}, "truncated"),
    "garbage-safetensors": (
        "junk.safetensors",
        lambda src, dst, m: dst.write_bytes(os.urandom(4096)),
        {},
        "not a readable safetensors file",
    ),
    "garbage-pt": (
        "junk.pt",
        lambda src, dst, m: dst.write_bytes(b"\x80\x02" + os.urandom(4094)),
        {},
        "junk.pt",
    ),
    "text-file": (
        "notes.pt",
        lambda src, dst, m: dst.write_text("not a model\n" * 10),
        {},
        "notes.pt",
    ),
    "wrong-arch": (
        "arch.safetensors",
        lambda src, dst, m: _rewrite_metadata(src, dst, arch="resnet50"),
        {},
        "architecture 'resnet50'",
    ),
    "corrupt-class-names-json": (
        "names.safetensors",
        lambda src, dst, m: _rewrite_metadata(src, dst, class_names='["none", "fall"'),
        {},
        "corrupt metadata",
    ),
    "class-names-not-a-list": (
        "names2.safetensors",
        lambda src, dst, m: _rewrite_metadata(src, dst, class_names='"abc"'),
        {},
        "class_names",
    ),
    "corrupt-preprocess-json": (
        "pre.safetensors",
        lambda src, dst, m: _rewrite_metadata(src, dst, preprocess="{resize: 128"),
        {},
        "corrupt metadata",
    ),
    "invalid-preprocess-contract": (
        "pre2.safetensors",
        lambda src, dst, m: _rewrite_metadata(src, dst, preprocess='{"crop": 0}'),
        {},
        "crop",
    ),
    "width-nan-in-metadata": (
        "w.safetensors",
        lambda src, dst, m: _rewrite_metadata(src, dst, width="nan"),
        {},
        "width",
    ),
    "class-count-mismatch-in-metadata": (
        "n.safetensors",
        lambda src, dst, m: _rewrite_metadata(src, dst, num_classes="4"),
        {},
        "3 class names for 4",
    ),
    "wrong-class-count-requested": (
        "ok.safetensors",
        lambda src, dst, m: dst.write_bytes(src.read_bytes()),
        {"num_classes": 8},
        "has 3 classes, but 8 were asked for",
    ),
    "wrong-width-requested": (
        "ok.safetensors",
        lambda src, dst, m: dst.write_bytes(src.read_bytes()),
        {"width": 0.125},
        "width",
    ),
    "state-dict-wrong-class-count": (
        "sd.pt",
        lambda src, dst, m: _state_dict_file(m, dst),
        {"width": SMALL, "num_classes": 8},
        "fc8.weight: expected shape (8, 256), got (3, 256)",
    ),
    "state-dict-wrong-width": (
        "sd.pt",
        lambda src, dst, m: _state_dict_file(m, dst),
        {"width": 0.125},
        "conv1.weight: expected shape (8, 3, 3, 3, 3), got (4, 3, 3, 3, 3)",
    ),
    "not-a-state-dict": (
        "obj.pt",
        lambda src, dst, m: torch.save({"lr": 0.1}, dst),
        {},
        "state dict of tensors",
    ),
}


@pytest.mark.parametrize(
    ("file_name", "make", "kwargs", "expected"), LOAD_ERRORS.values(), ids=LOAD_ERRORS.keys()
)
def test_every_load_error_is_a_one_line_weights_error(
    tmp_path: Path,
    checkpoint_path: Path,
    model: C3D_BN,
    file_name: str,
    make: Callable[[Path, Path, C3D_BN], None],
    kwargs: dict[str, Any],
    expected: str,
) -> None:
    path = tmp_path / "bad" / file_name
    path.parent.mkdir()
    make(checkpoint_path, path, model)
    with pytest.raises(WeightsError) as raised:
        load_checkpoint(path, **kwargs)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert expected in message


def test_shape_mismatches_are_reported_key_by_key(tmp_path: Path, model: C3D_BN) -> None:
    state = dict(model.state_dict())
    state["conv2.bias"] = torch.zeros(5)
    state["fc7.weight"] = torch.zeros(256, 7)
    state["extra.weight"] = torch.zeros(1)
    del state["conv4a_bn.running_var"]
    path = tmp_path / "mixed.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError) as raised:
        load_checkpoint(path, width=SMALL)
    message = str(raised.value)
    assert "\n" not in message
    assert "conv2.bias: expected shape (8,), got (5,)" in message
    assert "fc7.weight: expected shape (256, 256), got (256, 7)" in message
    assert "missing keys ['conv4a_bn.running_var']" in message
    assert "unexpected keys ['extra.weight']" in message
