"""How a stage starts and ends: the device it runs on (stages/core/device.py) and its exit codes
(stages/core/cli.py)."""

from __future__ import annotations

import pytest
import torch

from stages.core.cli import run_main
from stages.core.device import resolve_device
from stages.core.errors import PipelineError
from tests.conftest import default_params, error_line, run_stage, write_params


def _gpus(monkeypatch, count: int) -> None:
    """Pretend this machine has `count` CUDA GPUs (0: none)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


# ------------------------------------------------------------------------------ resolve_device


def test_auto_picks_a_gpu_only_when_one_is_present(monkeypatch):
    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == resolve_device(None) == here
    _gpus(monkeypatch, 0)
    assert resolve_device("auto") == resolve_device(None) == "cpu"
    _gpus(monkeypatch, 2)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cpu") == "cpu"  # an explicit cpu stays on the CPU


def test_cuda_without_a_gpu_is_one_line(monkeypatch):
    _gpus(monkeypatch, 0)
    with pytest.raises(PipelineError) as excinfo:
        resolve_device("cuda")
    assert str(excinfo.value) == "device: 'cuda' requested but no CUDA GPU is available"
    with pytest.raises(PipelineError) as excinfo:
        resolve_device("cuda:0", where="--device")
    assert str(excinfo.value) == "--device: 'cuda:0' requested but no CUDA GPU is available"


def test_cuda_index_beyond_the_gpus_present(monkeypatch):
    _gpus(monkeypatch, 1)
    assert resolve_device("cuda") == "cuda"
    assert resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(PipelineError) as excinfo:
        resolve_device("cuda:1")
    assert str(excinfo.value) == "device: 'cuda:1' requested but only 1 GPU(s) present"


@pytest.mark.parametrize("name", ["bogus", "CPU", "cuda:", "cuda:x", "gpu", ""])
def test_unknown_device_name_is_refused(name):
    with pytest.raises(PipelineError) as excinfo:
        resolve_device(name)
    assert str(excinfo.value) == f"device: unknown device {name!r} (auto, cpu, cuda or cuda:N)"


def test_bad_device_in_params_stops_a_stage_with_the_schema_line(tmp_path):
    params = default_params()
    params["device"] = "bogus"
    write_params(tmp_path, params)
    line = error_line(run_stage("download", "carpet", cwd=tmp_path))
    assert line == "error: device: must be auto, cpu, cuda or cuda:N, got 'bogus'"
    assert not (tmp_path / "data").exists()


# ------------------------------------------------------------------------------------ run_main


@pytest.fixture
def in_scratch(tmp_path, monkeypatch):
    """run_main first cleans the project's .tmp/: let it clean a scratch folder's."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _exit_code(main, capsys) -> tuple[object, str, str]:
    with pytest.raises(SystemExit) as excinfo:
        run_main(main)
    captured = capsys.readouterr()
    return excinfo.value.code, captured.out, captured.err


def test_run_main_pipeline_error_is_exit_1_and_one_line(in_scratch, capsys):
    def main():
        print("working")
        raise PipelineError("models.m.fit.epochs: must be an integer >= 1, got 0")

    code, out, err = _exit_code(main, capsys)
    assert code == 1
    assert out == "working\n"
    assert err == "error: models.m.fit.epochs: must be an integer >= 1, got 0\n"


def test_run_main_keyboard_interrupt_is_exit_130(in_scratch, capsys):
    def main():
        raise KeyboardInterrupt

    code, _, err = _exit_code(main, capsys)
    assert code == 130
    assert err == "error: interrupted\n"


def test_run_main_other_crash_is_exit_2_with_its_traceback(in_scratch, capsys):
    def crashing_stage():
        raise ValueError("unexpected shape (3, 4)")

    code, _, err = _exit_code(crashing_stage, capsys)
    assert code == 2
    assert err.startswith("Traceback (most recent call last):\n")
    assert "in crashing_stage" in err
    assert err.rstrip().splitlines()[-1] == "ValueError: unexpected shape (3, 4)"
    assert "error: " not in err


def test_run_main_success_returns_quietly(in_scratch, capsys):
    calls = []
    assert run_main(lambda: calls.append("ran")) is None
    assert calls == ["ran"]
    assert capsys.readouterr().err == ""
