"""``train.compile``: compiled training resumes bit-exact, reuses its compiled code, saves plain keys;
eval and export never compile; a model the compiler rejects stops with one paragraph (exit 2).

Compiling on the CPU takes seconds per model (gcc): these runs use tiny models and few steps, and
the multi-rank ones run with the slow tests.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_train.config import config_from_dict
from dist_train.data.writers.synth import synth_dataset
from dist_train.envvars import PREEMPTED_EXIT_CODE
from dist_train.errors import ConfigError
from tests.helpers.models import ResidualMLP
from tests.helpers.run import (
    assert_ok,
    dtrain,
    env_for_tests,
    load_final_model,
    make_image_h5,
    metric_history,
    start_dtrain,
    write_config,
)
from tests.test_eval_cli import TASKS, WCH5_SHAPE
from tests.test_export import _cli
from tests.test_resume import assert_same_state, held_out_metrics, step_history, wait_for_step


def compiled_config(tmp_path: Path, name: str, data_path: Path, **sections: dict[str, Any]) -> Path:
    train = {"epochs": 3, "precision": "fp32", "log_every": 2, "compile": True, **sections.pop("train", {})}
    return write_config(
        tmp_path / f"{name}.toml",
        data_path,
        run={"name": name, "output_dir": str(tmp_path / "runs"), "seed": 1, "deterministic": True},
        train=train,
        **sections,
    )


def launch(
    tmp_path: Path, cfg: Path, run_dir: Path, *extra: str, nproc: int = 1, env: dict[str, str] | None = None
) -> Any:
    args = ("launch", "--gpus", "cpu", "--nproc", str(nproc), str(cfg), "--run-dir", str(run_dir), *extra)
    return dtrain(*args, cwd=tmp_path, env=env)


def cache_hits(log_text: str) -> list[int]:
    """The FX graph cache hits of each start's first-step report."""
    return [int(n) for n in re.findall(r"FX graph cache: (\d+) hit", log_text)]


def assert_plain_keys(model_state: dict[str, Any]) -> None:
    assert model_state and not [k for k in model_state if "_orig_mod" in k or "module." in k], list(model_state)


def test_unknown_compile_mode_is_refused_naming_the_choices() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"train": {"compile": True, "compile_mode": "fastest"}}, "c.toml")
    text = str(err.value)
    assert "compile_mode" in text and "'fastest'" in text and "'reduce-overhead'" in text and "\n" not in text


def test_compiled_regression_resumes_bit_exact_reuses_its_cache_and_eval_and_export_never_compile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    data = synth_dataset(tmp_path / "d.h5", layout="wch5", events=120, seed=2, shape=WCH5_SHAPE, progress=False)
    model = {"name": "mlp", "hidden": [8]}
    task = TASKS["regression"][0]

    # Stopped after epoch 2 and relaunched: the relaunch finds the compiled code in the run's own cache.
    cut = tmp_path / "cut"
    cfg = compiled_config(tmp_path, "cut", data, model=model, task=task)
    assert_ok(launch(tmp_path, cfg, cut, "--set", "train.epochs=2"))
    assert_ok(launch(tmp_path, cfg, cut))
    log = (cut / "logs" / "rank0.log").read_text()
    assert "resumed from" in log
    first, relaunch = cache_hits(log)
    assert first == 0 and relaunch > 0, log

    # Uninterrupted, with the user's own TORCHINDUCTOR_CACHE_DIR (the cut run's cache): that one is used.
    ref = tmp_path / "ref"
    ref_env = env_for_tests({"TORCHINDUCTOR_CACHE_DIR": str(cut / "compile_cache")})
    assert_ok(launch(tmp_path, compiled_config(tmp_path, "ref", data, model=model, task=task), ref, env=ref_env))
    assert cache_hits((ref / "logs" / "rank0.log").read_text())[0] > 0 and not (ref / "compile_cache").exists()

    final = load_final_model(cut)
    assert_plain_keys(final["model"])
    assert_same_state(load_final_model(ref), final)
    assert metric_history(ref, ("train/loss", "val/loss")) == metric_history(cut, ("train/loss", "val/loss"))

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("eval and export must not compile")

    monkeypatch.setattr(torch, "compile", refuse)
    monkeypatch.setattr(torch.nn.Module, "compile", refuse)
    assert "test/loss" in _cli(capsys, "eval", str(cut), "--split", "test", "--json")
    out = tmp_path / "model.pt"
    _cli(capsys, "ckpt", "export", str(cut), str(out))
    exported = torch.load(out, weights_only=True)
    assert_plain_keys(exported)
    assert exported.keys() == final["model"].keys()


def test_a_model_the_compiler_rejects_stops_with_one_paragraph_naming_it(tmp_path: Path) -> None:
    data = make_image_h5(tmp_path / "d.h5", events=100)
    name = "tests.helpers.models:BranchingMLP"
    cfg = compiled_config(
        tmp_path,
        "bad",
        data,
        model={"name": name, "num_classes": 3, "in_features": 72},
        train={"compile_fullgraph": True},
    )
    run_dir = tmp_path / "bad"
    proc = launch(tmp_path, cfg, run_dir)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert f"model {name!r} cannot be compiled" in text and "fullgraph" in text and "compile_fullgraph = false" in text
    assert "Traceback" not in text
    assert "torch.compile failed for model" in (run_dir / "logs" / "rank0.log").read_text()  # the whole error
    assert not (run_dir / "completed").exists()


def stop_then_resume_matches_uninterrupted(
    tmp_path: Path, config: Callable[[str], Path], stop_after: int, env: dict[str, str] | None = None
) -> tuple[dict[str, Any], Path]:
    """A 2-rank run "ref" uninterrupted; the same run "cut" stopped by SIGTERM once it logged step
    ``stop_after`` (exit 75), then relaunched: the relaunch must end exactly as ref did (state, metric and
    step histories, held-out metrics). Returns the stop's checkpoint and the cut run's directory."""
    ref = tmp_path / "ref"
    assert_ok(launch(tmp_path, config("ref"), ref, nproc=2, env=env))
    run_dir = tmp_path / "cut"
    args = ("launch", "--gpus", "cpu", "--nproc", "2", str(config("cut")), "--run-dir", str(run_dir))
    proc = start_dtrain(*args, cwd=tmp_path, env=env)
    wait_for_step(run_dir, stop_after, proc, timeout=300)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out
    cut = load_final_model(run_dir)
    assert_plain_keys(cut["model"])

    assert_ok(dtrain(*args, cwd=tmp_path, env=env))
    assert_same_state(load_final_model(ref), load_final_model(run_dir))
    assert metric_history(ref) == metric_history(run_dir)
    assert step_history(ref, cut["step"]) == step_history(run_dir, cut["step"])
    assert held_out_metrics(ref) == held_out_metrics(run_dir) != []
    return cut, run_dir


@pytest.mark.slow  # two compiled 2-rank runs and a relaunch: about a minute on 2 cores
def test_compiled_ddp_sigterm_mid_epoch_then_resume_is_bit_exact(tmp_path: Path) -> None:
    data = make_image_h5(tmp_path / "d.h5", events=600)
    steps_per_epoch = 480 // 16

    def config(name: str) -> Path:
        return compiled_config(
            tmp_path,
            name,
            data,
            data={"batch_size": 8, "num_workers": 0},
            model={"name": "tests.helpers.models:SlowMLP", "num_classes": 3, "in_features": 72, "delay": 0.01},
            train={"log_every": 1, "stop_check_every": 2},
        )

    cut, run_dir = stop_then_resume_matches_uninterrupted(tmp_path, config, steps_per_epoch + 2)
    assert steps_per_epoch < cut["step"] < 2 * steps_per_epoch, "the stop must land mid-epoch"
    assert cache_hits((run_dir / "logs" / "rank0.log").read_text())[-1] > 0


@pytest.mark.slow  # a compiled 2-rank FSDP run
def test_compiled_fsdp_compiles_each_block_and_checkpoints_plain_keys_with_a_custom_task(tmp_path: Path) -> None:
    data = synth_dataset(tmp_path / "d.h5", layout="wch5", events=120, seed=2, shape=WCH5_SHAPE, progress=False)
    cfg = compiled_config(
        tmp_path,
        "fsdp",
        data,
        model={"name": "tests.helpers.models:ResidualMLP", "num_classes": 1, "in_features": 72},
        task=TASKS["custom"][0],
        train={"epochs": 2, "strategy": "fsdp"},
        fsdp={"wrap": ["ResidualBlock"]},
    )
    run_dir = tmp_path / "fsdp"
    assert_ok(launch(tmp_path, cfg, run_dir, nproc=2))
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "2 FSDP unit(s) one by one (ResidualBlock)" in log
    graphs = re.search(r"(\d+) graph\(s\)", log)
    assert graphs is not None and int(graphs.group(1)) >= 1, log
    final = load_final_model(run_dir)
    assert final["model"].keys() == ResidualMLP(1, 72).state_dict().keys()
    assert all(torch.isfinite(v).all() for v in final["model"].values())


@pytest.mark.slow  # three compiled 2-rank runs of a BatchNorm CNN: about two minutes on 2 cores
def test_compiled_bn_cnn_in_bf16_and_channels_last_stopped_in_its_last_steps_resumes_bit_exact(tmp_path: Path) -> None:
    """What physicists run, compiled: BatchNorm (running statistics in the checkpoint), bf16 autocast,
    channels_last weights and inputs, 2 ranks, epochs of a handful of steps, and a stop three steps
    before the end. The relaunch must finish the run exactly as the uninterrupted one did."""
    data = make_image_h5(tmp_path / "d.h5", events=200)
    steps_per_epoch, epochs = 160 // 16, 3  # 160 training events, global batch 16
    last = steps_per_epoch * epochs
    cache = env_for_tests({"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})  # one cold compile in all

    def config(name: str) -> Path:
        return compiled_config(
            tmp_path,
            name,
            data,
            data={"batch_size": 8, "num_workers": 0},
            model={"name": "tests.helpers.models:BNConvNet", "num_classes": 3, "channels": 8, "delay": 0.2},
            train={"epochs": epochs, "precision": "bf16", "channels_last": True, "log_every": 1, "stop_check_every": 1},
        )

    cut, _ = stop_then_resume_matches_uninterrupted(tmp_path, config, last - 3, env=cache)
    assert last - 3 <= cut["step"] < last, "the stop must land in the last steps"
    assert any(k.endswith("running_mean") for k in cut["model"])
