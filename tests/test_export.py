"""`dtrain ckpt export` of a single-file checkpoint: a plain state_dict, metadata in the sidecar, still `dtrain eval`-able.

(The sharded counterpart is in tests/test_sharded_checkpoint.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_train.checkpoint.catalog import latest_valid_checkpoint
from dist_train.checkpoint.file import load_checkpoint, verify_checkpoint
from launcher.cli import main as cli_main
from tests.helpers.models import TinyBNConvNet
from tests.helpers.run import assert_ok, dtrain, make_image_h5, write_config


def _cli(capsys: pytest.CaptureFixture[str], *args: str, code: int = 0) -> str:
    """`dtrain ARGS` in this process (no interpreter start-up per command); its stdout, or stderr on failure."""
    assert cli_main(list(args)) == code
    out, err = capsys.readouterr()
    return out if code == 0 else err


def test_export_writes_what_load_state_dict_takes_and_eval_reads_it_with_the_sidecar(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    data = make_image_h5(tmp_path / "d.h5", events=120, shape=(2, 6, 6))
    cfg = write_config(
        tmp_path / "c.toml",
        data,
        model={"name": "tests.helpers.models:TinyBNConvNet", "num_classes": 3, "channels": 4},
        train={"epochs": 2, "precision": "fp32", "log_every": 5},
    )
    run_dir = tmp_path / "run"
    assert_ok(dtrain("launch", "--gpus", "cpu", "--nproc", "1", str(cfg), "--run-dir", str(run_dir), cwd=tmp_path))
    latest = latest_valid_checkpoint(run_dir / "checkpoints")
    assert latest is not None and latest.is_file()

    out = tmp_path / "export" / "model.pt"
    _cli(capsys, "ckpt", "export", str(run_dir), str(out))
    model = TinyBNConvNet((2, 6, 6), 3, channels=4)
    model.load_state_dict(torch.load(out, weights_only=True))  # strict: exactly the model's keys
    for key, value in load_checkpoint(latest)["model"].items():
        assert torch.equal(model.state_dict()[key], value), key  # BatchNorm buffers included
    assert verify_checkpoint(out) is None
    meta = json.loads((out.parent / "model.pt.sha256.json").read_text())
    assert (meta["format"], meta["epoch"], meta["source"]) == ("dtrain-model-export", 2, str(latest))
    assert meta["config"]["model"]["name"] == "tests.helpers.models:TinyBNConvNet" and "val/loss" in meta["metrics"]

    a = json.loads(_cli(capsys, "eval", str(run_dir), "--split", "test", "--json"))
    b = json.loads(_cli(capsys, "eval", str(out), "--split", "test", "--json"))
    assert {k: v for k, v in a.items() if k != "checkpoint"} == {k: v for k, v in b.items() if k != "checkpoint"}
    inspect = _cli(capsys, "ckpt", "inspect", str(out))
    assert "epoch  2" in inspect and "reason  export" in inspect

    (out.parent / "model.pt.sha256.json").unlink()  # without its sidecar, eval has no config: a clear error
    lost = _cli(capsys, "eval", str(out), "--split", "test", code=2)
    assert "model.pt.sha256.json" in lost and "Traceback" not in lost
