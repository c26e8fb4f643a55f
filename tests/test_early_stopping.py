"""Early stopping (train.early_stop_patience) and the end-of-run test of the best checkpoint (train.test_checkpoint).

The counter is tested in-process; everything else runs `dtrain launch` over real torchrun/gloo ranks
and reads back metrics.jsonl, the checkpoints and `dtrain eval`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from dist_train.config import config_from_dict
from dist_train.early_stopping import EarlyStopping, build_early_stopping
from dist_train.errors import ConfigError
from launcher.cli import main as cli_main
from tests.helpers.run import assert_ok, dtrain, make_image_h5, records, write_config


# ---------------------------------------------------------------------------------------- the counter
def test_patience_counts_epochs_without_an_improvement_larger_than_min_delta() -> None:
    stopper = EarlyStopping("val/loss", "min", patience=2, min_delta=0.1)
    assert not stopper.step({"val/loss": 1.0}, 1)
    assert not stopper.step({"val/loss": 0.95}, 2), "0.05 better is below min_delta: wait 1"
    assert not stopper.step({"train/loss": 0.1}, 3), "an epoch without the monitor neither counts nor resets"
    assert not stopper.step({"val/loss": 0.8}, 4), "0.2 better: the wait starts again"
    assert (stopper.best, stopper.best_epoch, stopper.wait) == (0.8, 4, 0)
    assert not stopper.step({"val/loss": math.nan}, 5), "NaN is never an improvement"
    assert stopper.step({"val/loss": 0.79}, 6)
    assert stopper.stopped_epoch == 6 and stopper.best == 0.8
    assert "after epoch 6" in stopper.reason() and "0.8 after epoch 4" in stopper.reason()


def test_max_mode_and_zero_patience() -> None:
    stopper = EarlyStopping("val/accuracy", "max", patience=1, min_delta=0.0)
    assert not stopper.step({"val/accuracy": 0.5}, 1)
    assert not stopper.step({"val/accuracy": 0.6}, 2)
    assert stopper.step({"val/accuracy": 0.6}, 3), "equal is not better"
    off = EarlyStopping("val/loss", "min", patience=0, min_delta=0.0)
    assert not any(off.step({"val/loss": 1.0}, epoch) for epoch in range(1, 20))


def _two_ranks_disagreeing(rank: int, init_file: str, out_dir: str) -> None:
    """Rank 1 sees a slightly worse value at epoch 2 (a last-bit difference): only its own count runs out."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    stopper = EarlyStopping("val/loss", "min", patience=1, min_delta=0.0)
    stops = [
        stopper.step({"val/loss": value + (1e-12 if rank == 1 and epoch == 2 else 0.0)}, epoch)
        for epoch, value in ((1, 1.0), (2, 0.9999999999995), (3, 0.5))
    ]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"stops": stops, "stopped_epoch": stopper.stopped_epoch}))
    dist.destroy_process_group()


def test_ranks_that_disagree_still_stop_at_the_same_epoch(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_two_ranks_disagreeing, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1] == {"stops": [False, True, True], "stopped_epoch": 2}


def test_state_round_trips_and_a_changed_monitor_starts_fresh() -> None:
    stopper = EarlyStopping("val/loss", "min", patience=3, min_delta=0.0)
    for epoch, value in enumerate([1.0, 0.5, 0.7, 0.6], start=1):
        stopper.step({"val/loss": value}, epoch)
    again = EarlyStopping("val/loss", "min", patience=3, min_delta=0.0)
    again.load_state_dict(stopper.state_dict())
    assert (
        again.state_dict()
        == stopper.state_dict()
        == {"monitor": "val/loss", "best": 0.5, "best_epoch": 2, "wait": 2, "stopped_epoch": 0}
    )
    other = EarlyStopping("val/accuracy", "max", patience=3, min_delta=0.0)
    other.load_state_dict(stopper.state_dict())
    assert (other.best, other.wait) == (None, 0)


def test_config_keys_are_checked() -> None:
    cfg = config_from_dict({})
    assert (cfg.train.early_stop_patience, cfg.train.early_stop_min_delta, cfg.train.test_checkpoint) == (
        0,
        0.0,
        "best",
    )
    for raw, message in (
        ({"train": {"early_stop_patience": -1}}, "train.early_stop_patience = -1 must be >= 0"),
        ({"train": {"early_stop_min_delta": -0.5}}, "train.early_stop_min_delta = -0.5 must be >= 0"),
        ({"train": {"test_checkpoint": "bets"}}, "Did you mean 'best'?"),
        ({"train": {"early_stop_patiense": 3}}, "Did you mean 'early_stop_patience'?"),
    ):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            config_from_dict(raw, origin="c.toml")
    with pytest.raises(ConfigError, match="data.val_split = 0 leaves no validation split"):
        config_from_dict({"train": {"early_stop_patience": 2}, "data": {"val_split": 0.0}}, origin="c.toml")
    # A split_file whose val_idxs turn out empty is only known once the data is read.
    empty_val = config_from_dict({"train": {"early_stop_patience": 2}, "data": {"split_file": "s.npz"}})
    with pytest.raises(ConfigError, match="no validation split"):
        build_early_stopping(empty_val, has_val_data=False)


# ---------------------------------------------------------------------------------------- real runs
def _config(
    tmp_path: Path, name: str, data: Path, *, model: dict[str, Any] | None = None, **sections: dict[str, Any]
) -> Path:
    train = {"epochs": 6, "log_every": 5, "precision": "fp32", "stop_check_every": 2, **sections.pop("train", {})}
    return write_config(
        tmp_path / f"{name}.toml",
        data,
        run={"name": name, "output_dir": str(tmp_path / "runs"), "seed": 3},
        model=model or {"name": "mlp", "num_classes": 3, "hidden": [8]},
        train=train,
        **sections,
    )


def _launch(cfg: Path, run_dir: Path, nproc: int, *extra: str) -> str:
    proc = dtrain(
        "launch", "--gpus", "cpu", "--nproc", str(nproc), str(cfg), "--run-dir", str(run_dir), *extra, cwd=cfg.parent
    )
    assert_ok(proc)
    return proc.stdout + proc.stderr


def _test_metrics(run_dir: Path) -> dict[str, float]:
    (record,) = records(run_dir, "test")
    return {k: v for k, v in record.items() if k.startswith("test/")}


def test_early_stop_ends_every_rank_at_the_same_epoch_and_a_resumed_run_counts_on(tmp_path: Path) -> None:
    """min_delta larger than any change: nothing improves after epoch 1, so patience 2 stops after epoch 3 of 6.
    A run cut after epoch 2 and resumed stops after epoch 3 too (the wait came from the checkpoint)."""
    data = make_image_h5(tmp_path / "d.h5", events=200)
    early = {"early_stop_patience": 2, "early_stop_min_delta": 100.0}
    cfg = _config(tmp_path, "ref", data, train=early)
    ref = tmp_path / "ref"
    _launch(cfg, ref, 2)
    assert [r["epoch"] for r in records(ref, "epoch")] == [1, 2, 3]
    assert (ref / "completed").exists() and not (ref / "preempted").exists()
    log = (ref / "logs" / "rank0.log").read_text()
    assert "early stopping after epoch 3: val/loss has not improved by more than 100" in log
    assert "early stopping after epoch 3" in (ref / "logs" / "rank1.log").read_text(), "rank 1 agreed"
    assert (ref / "checkpoints" / "latest").read_text().startswith("ckpt-e0003-"), "the last checkpoint is written"
    (test_record,) = records(ref, "test")
    assert test_record["epoch"] == 3

    cut = tmp_path / "cut"
    _launch(_config(tmp_path, "cut", data, train={**early, "epochs": 2}), cut, 2)
    assert [r["epoch"] for r in records(cut, "epoch")] == [1, 2]
    _launch(cfg, cut, 2)
    assert "resumed from" in (cut / "logs" / "rank0.log").read_text()
    assert [r["epoch"] for r in records(cut, "epoch")] == [1, 2, 3]
    assert "early stopping after epoch 3" in (cut / "logs" / "rank0.log").read_text()
    assert _test_metrics(cut) == _test_metrics(ref)

    # Relaunching a stopped run trains nothing more: it stays stopped (and tests again).
    _launch(cfg, ref, 2)
    assert [r["epoch"] for r in records(ref, "epoch")] == [1, 2, 3]


def _bn_config(tmp_path: Path, name: str, data: Path, **train: Any) -> Path:
    return _config(
        tmp_path,
        name,
        data,
        model={"name": "tests.helpers.models:TinyBNConvNet", "num_classes": 3, "channels": 4},
        train={"epochs": 4, **train},
        optim={"name": "adam", "lr": 0.05},
        # The highest validation loss is "best": training lowers it, so best.pt is an early epoch, not the last.
        checkpoint={"monitor": "val/loss", "mode": "max", "keep_last": 1},
    )


def _eval(run_dir: Path, capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    """`dtrain eval RUN_DIR --split test` in this process (the workers' model module imports the same way)."""
    assert cli_main(["eval", str(run_dir), "--split", "test", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(("strategy", "nproc"), [("ddp", 3), pytest.param("fsdp", 2, marks=pytest.mark.slow)])
def test_end_of_run_test_evaluates_best_checkpoint_as_dtrain_eval_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], strategy: str, nproc: int
) -> None:
    """A BatchNorm CNN over 3 ranks; the best epoch is an earlier one than the last."""
    data = make_image_h5(tmp_path / "d.h5", events=240, seed=5)
    run_dir = tmp_path / "best"
    _launch(_bn_config(tmp_path, "best", data, strategy=strategy), run_dir, nproc)
    epochs = records(run_dir, "epoch")
    (test_record,) = records(run_dir, "test")
    best_epoch = max(epochs, key=lambda r: r["val/loss"])  # the first of equal values stays best
    assert best_epoch["epoch"] < epochs[-1]["epoch"], "the test needs a best epoch before the last"
    assert test_record["checkpoint"]["which"] == "best"
    assert (test_record["checkpoint"]["epoch"], test_record["checkpoint"]["step"]) == (
        best_epoch["epoch"],
        best_epoch["step"],
    )
    assert (test_record["epoch"], test_record["step"]) == (epochs[-1]["epoch"], epochs[-1]["step"])
    evaluated = _eval(run_dir, capsys, "--checkpoint", "best")
    assert (evaluated["epoch"], evaluated["step"]) == (best_epoch["epoch"], best_epoch["step"])
    for key, value in _test_metrics(run_dir).items():
        assert evaluated[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key


def test_test_checkpoint_last_evaluates_the_final_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_image_h5(tmp_path / "d.h5", events=240, seed=5)
    run_dir = tmp_path / "last"
    # An MLP: with BatchNorm the ranks' last running statistics differ (DDP broadcasts rank 0's only
    # before each forward), and only best.pt's would be the same everywhere.
    cfg = _config(tmp_path, "last", data, train={"epochs": 2, "test_checkpoint": "last"})
    _launch(cfg, run_dir, 2)
    (test_record,) = records(run_dir, "test")
    last_epoch = records(run_dir, "epoch")[-1]
    assert test_record["checkpoint"] == {"which": "last", "epoch": 2, "step": last_epoch["step"]}
    evaluated = _eval(run_dir, capsys)  # the newest checkpoint: the last weights
    assert evaluated["epoch"] == 2
    for key, value in _test_metrics(run_dir).items():
        assert evaluated[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
