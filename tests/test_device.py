"""Device and precision names: one vocabulary for the config, the command line, training and
inference, one ``select_device``, and one clear line for a bad value."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import pytest
import torch

from streamdet.cli import build_parser, main
from streamdet.config import load_config
from streamdet.device import Amp, Device, Precision, select_device
from streamdet.errors import ConfigError
from streamdet.training import config as train_config


def _choices(parser: argparse.ArgumentParser, command: str, option: str) -> list[str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    action = next(a for a in sub.choices[command]._actions if option in a.option_strings)
    return list(action.choices)


def test_the_command_line_offers_exactly_the_config_values() -> None:
    parser = build_parser()

    assert _choices(parser, "run", "--device") == Device.values() == ["auto", "cpu", "cuda"]
    assert _choices(parser, "run", "--precision") == Precision.values()
    assert _choices(parser, "train", "--device") == Device.values()
    assert _choices(parser, "eval", "--device") == Device.values()


def test_config_values_become_members_that_read_as_their_strings() -> None:
    cfg = load_config(None, {"model": {"device": "cpu", "precision": "int8"}})

    assert cfg.model.device is Device.CPU and cfg.model.precision is Precision.INT8
    assert cfg.model.device == "cpu" and f"{cfg.model.precision}" == "int8"
    assert cfg.model.model_dump(mode="json")["precision"] == "int8"
    assert load_config(None).model.device is Device.AUTO  # the default is a member too


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"device": "tpu"}, "model.device: Input should be 'auto', 'cpu' or 'cuda'"),
        (
            {"precision": "fp64"},
            "model.precision: Input should be 'auto', 'fp32', 'bf16', 'fp16' or 'int8'",
        ),
    ],
)
def test_a_bad_config_value_is_one_line_listing_the_allowed_values(
    overrides: dict, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, {"model": overrides})

    assert str(err.value) == message


def test_a_bad_training_amp_lists_the_allowed_values(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("amp: fp8\n")

    with pytest.raises(
        ConfigError, match=r"amp: Input should be 'auto', 'bf16', 'fp16' or 'off' \(1 error"
    ):
        train_config.load_config(path)
    assert train_config.load_config(path, {"amp": "off", "device": "cpu"}).amp is Amp.OFF


def test_a_bad_command_line_precision_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--precision", "fp64"])

    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "invalid choice: 'fp64' (choose from 'auto', 'fp32', 'bf16', 'fp16', 'int8')" in err


@pytest.mark.parametrize(
    ("requested", "cuda", "expectation", "expected"),
    [
        ("auto", False, contextlib.nullcontext(), "cpu"),
        ("auto", True, contextlib.nullcontext(), "cuda"),
        (Device.CPU, True, contextlib.nullcontext(), "cpu"),
        ("cuda", True, contextlib.nullcontext(), "cuda"),
        ("cuda", False, pytest.raises(ConfigError, match="no CUDA device is available"), None),
        (
            "tpu",
            False,
            pytest.raises(ValueError, match="^device must be auto, cpu or cuda, but got 'tpu'$"),
            None,
        ),
    ],
)
def test_select_device(
    monkeypatch: pytest.MonkeyPatch, requested: str, cuda: bool, expectation, expected: str | None
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)

    with expectation:
        assert select_device(requested) == torch.device(expected)


def test_training_and_inference_share_select_device() -> None:
    from streamdet.inference import select_device as inference_select
    from streamdet.training import evaluate, trainer

    assert inference_select is trainer.select_device is evaluate.select_device is select_device


def test_amp_shares_the_precision_spellings() -> None:
    assert {a.value for a in Amp} - {"off"} <= set(Precision.values())
