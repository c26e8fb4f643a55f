"""The GPU paths for real: NVML, reservation of a live GPU, CUDA AMP, NCCL, async saves from device memory.

Skipped where torch sees no CUDA device (CI has none); run on a GPU machine with
``pytest tests/test_gpu.py``. One GPU is enough: every launch here is one rank (NCCL cannot run two
ranks on one device), and "another user's job" is a second process holding memory on the same GPU.
FSDP on one GPU is a world of size 1 on a private NCCL group: nothing is sharded, but mixed precision,
DTensor parameters, sharded (DCP) async saves from GPU memory, resume, export and eval run for real.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from dist_train.checkpoint.file import CheckpointManager, load_checkpoint
from dist_train.checkpoint.sharded import ShardedCheckpointManager, consolidate, verify_sharded_checkpoint
from dist_train.data.device_feed import CudaStreams, DeviceFeed
from dist_train.envvars import PREEMPTED_EXIT_CODE
from tests.helpers.run import (
    REPO,
    assert_ok,
    dtrain,
    env_for_tests,
    load_final_model,
    make_image_h5,
    metric_history,
    records,
    start_dtrain,
    write_config,
)
from tests.test_device_feed import batches as feed_batches
from tests.test_device_feed import config_for as feed_config
from tests.test_device_feed import write_h5 as write_feed_h5
from tests.test_launch_failures import wait_for_step as wait_for_new_run
from tests.test_resume import assert_same_state, wait_for_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CI has none")


def gpu_env() -> dict[str, str]:
    env = env_for_tests()
    env.pop("DTRAIN_NVML_RECORD", None)  # the real driver, never recorded states
    return env


def gpus_json(*extra: str) -> list[dict]:
    proc = dtrain("gpus", "--json", *extra, cwd=REPO, env=gpu_env())
    assert_ok(proc)
    return json.loads(proc.stdout)["gpus"]


@pytest.fixture
def occupier() -> Iterator[subprocess.Popen[str]]:
    """Another user's job: 4 GiB held and matmuls running on GPU 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.gpu_occupier", "4"],
        cwd=REPO,
        env=gpu_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(1.0)  # NVML's utilisation is averaged over its last sample period
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


def gpu_config(tmp_path: Path, name: str, **sections: dict) -> Path:
    data = tmp_path / "d.h5"
    if not data.exists():
        make_image_h5(data, events=600)
    sections.setdefault("run", {"name": name, "output_dir": str(tmp_path / "runs"), "seed": 1})
    return write_config(tmp_path / f"{name}.toml", data, **sections)


def test_dtrain_gpus_reads_the_real_driver() -> None:
    gpus = gpus_json()
    assert len(gpus) == torch.cuda.device_count()
    first = gpus[0]
    assert first["name"] == torch.cuda.get_device_name(0)
    assert first["uuid"].startswith("GPU-")
    total_mib = torch.cuda.get_device_properties(0).total_memory / 2**20
    assert abs(first["memory_total_mb"] - total_mib) / total_mib < 0.05


def test_a_gpu_used_by_another_process_is_busy_and_auto_refuses_it(tmp_path: Path, occupier) -> None:
    status = gpus_json()[0]
    assert not status["free"], status
    assert any("MiB memory used" in r or "compute processes" in r for r in status["busy_reasons"]), status
    cfg = gpu_config(tmp_path, "busy")
    proc = dtrain(
        "launch", "--gpus", "auto", str(cfg), "--lock-dir", str(tmp_path / "locks"), cwd=tmp_path, env=gpu_env()
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Not enough free GPUs" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.pt")), "nothing may have trained"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_on_the_gpu_with_mixed_precision(tmp_path: Path, precision: str) -> None:
    cfg = gpu_config(tmp_path, precision, train={"epochs": 2, "precision": precision, "log_every": 5})
    run_dir = tmp_path / "run"
    proc = dtrain(
        "launch",
        "--gpus",
        "auto",
        str(cfg),
        "--run-dir",
        str(run_dir),
        "--lock-dir",
        str(tmp_path / "locks"),
        cwd=tmp_path,
        env=gpu_env(),
    )
    assert_ok(proc)
    assert "reserved GPU 0" in proc.stdout + proc.stderr
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "device cuda:0" in log and f"precision {precision}" in log, log
    epochs = records(run_dir, "epoch")
    assert len(epochs) == 2 and all(r["train/loss"] == r["train/loss"] for r in epochs)
    assert epochs[-1]["train/loss"] < epochs[0]["train/loss"] * 1.05
    ckpt = load_final_model(run_dir)
    assert all(t.device.type == "cpu" for t in ckpt["model"].values()), "checkpoints load without a GPU"
    if precision == "fp16":
        assert ckpt["scaler"]["scale"] > 0, "the GradScaler's state is part of the checkpoint"
    assert_ok(dtrain("eval", str(run_dir), "--split", "val", cwd=tmp_path, env=gpu_env()))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_debug_mode_runs_on_one_reserved_gpu_and_releases_it(tmp_path: Path, precision: str) -> None:
    """`dtrain launch cfg.toml --debug` on a GPU machine: one process (no torchrun) on one free GPU, reserved
    and shown by `dtrain gpus` while it runs, released after Ctrl-C, and the same command resumes it."""
    from launcher.run_dirs import is_debug_run, is_in_use

    locks = str(tmp_path / "locks")
    name = f"debug-{precision}"
    cfg = gpu_config(
        tmp_path,
        name,
        model={"name": "tests.helpers.models:SlowMLP", "num_classes": 3, "in_features": 72, "delay": 0.05},
        train={"epochs": 40, "precision": precision, "log_every": 1, "stop_check_every": 1},
    )
    # --wait: NVML's utilisation of an earlier test's GPU work may take a moment to fall below the threshold.
    command = ("launch", str(cfg), "--debug", "--lock-dir", locks, "--wait", "--timeout", "120")
    proc = start_dtrain(*command, cwd=tmp_path, env=gpu_env())
    try:
        run_dir = wait_for_new_run(tmp_path / "runs", 2, proc, pattern=f"{name}/*/metrics.jsonl")
        assert run_dir.name.endswith("-debug") and is_debug_run(run_dir) and is_in_use(run_dir)
        held = [g for g in gpus_json("--lock-dir", locks) if g["reserved_by"]]
        assert len(held) == 1, held
        assert held[0]["reserved_by"]["run_dir"] == str(run_dir) and held[0]["reserved_by"]["pid"] == proc.pid
        children = psutil.Process(proc.pid).children(recursive=True)
        assert not any("launcher.torchrun_main" in p.cmdline() for p in children), "debug mode runs no torchrun"
        (worker,) = [p for p in children if "dist_train" in p.cmdline()]
        assert worker.environ()["CUDA_VISIBLE_DEVICES"] == held[0]["uuid"]
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == PREEMPTED_EXIT_CODE, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert f"reserved GPU {held[0]['index']} ({held[0]['uuid']})" in out
    assert not any(g["reserved_by"] for g in gpus_json("--lock-dir", locks)), "the GPU is released on exit"
    assert not is_in_use(run_dir)
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "device cuda:0" in log and f"precision {precision}" in log and "world size 1" in log, log
    epochs = records(run_dir, "epoch")
    assert epochs and [r["step"] for r in epochs] == [5 * (i + 1) for i in range(len(epochs))], "5 batches an epoch"
    assert all(r["train/loss"] == r["train/loss"] for r in epochs), "no NaN under anomaly detection"
    if precision == "fp16":
        assert load_final_model(run_dir)["scaler"]["scale"] > 0, "the GradScaler's state is part of the checkpoint"

    # The same command resumes the debug run on a GPU again (finishing the interrupted epoch) and releases it.
    finish = dtrain(*command, "--set", f"train.epochs={len(epochs) + 1}", cwd=tmp_path, env=gpu_env())
    assert_ok(finish)
    assert f"resuming run in {run_dir}" in finish.stderr and "reserved GPU" in finish.stderr
    assert "resumed from" in (run_dir / "logs" / "rank0.log").read_text()
    assert len(records(run_dir, "epoch")) == len(epochs) + 1
    assert not any(g["reserved_by"] for g in gpus_json("--lock-dir", locks))


def test_reserved_gpu_is_refused_and_a_preempted_gpu_run_resumes_bit_exact(tmp_path: Path) -> None:
    """fp16 on the GPU with deterministic kernels: the GradScaler's state travels through the checkpoint."""
    locks = str(tmp_path / "locks")

    def config(name: str) -> Path:
        return gpu_config(
            tmp_path,
            name,
            run={"name": name, "output_dir": str(tmp_path / "runs"), "seed": 1, "deterministic": True},
            data={"batch_size": 8},
            model={"name": "tests.helpers.models:SlowMLP", "num_classes": 3, "in_features": 72, "delay": 0.02},
            train={"epochs": 3, "precision": "fp16", "log_every": 1, "stop_check_every": 2},
        )

    ref = tmp_path / "ref"
    assert_ok(
        dtrain(
            "launch",
            "--gpus",
            "auto",
            str(config("ref")),
            "--run-dir",
            str(ref),
            "--lock-dir",
            locks,
            cwd=tmp_path,
            env=gpu_env(),
        )
    )

    run_dir = tmp_path / "cut"
    args = ("launch", "--gpus", "0,", str(config("cut")), "--run-dir", str(run_dir), "--lock-dir", locks)
    proc = start_dtrain(*args, cwd=tmp_path, env=gpu_env())
    steps_per_epoch = 60  # 480 training samples / 8
    wait_for_step(run_dir, 1, proc)

    # --force overrides "looks busy" (the memory the run uses), never another job's reservation.
    second = dtrain(
        "launch", "--gpus", "0,", "--force", str(config("second")), "--lock-dir", locks, cwd=tmp_path, env=gpu_env()
    )
    assert second.returncode == 2, second.stdout + second.stderr
    assert "reserved" in second.stderr and "Traceback" not in second.stderr, second.stderr

    wait_for_step(run_dir, steps_per_epoch + 20, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out
    cut = load_final_model(run_dir)
    assert cut["reason"] == "preempt" and not cut["epoch_complete"], "the stop must land mid-epoch"
    assert_ok(dtrain(*args, cwd=tmp_path, env=gpu_env()))
    assert "resumed from" in (run_dir / "logs" / "rank0.log").read_text()
    assert_same_state(load_final_model(ref), load_final_model(run_dir))
    assert metric_history(ref) == metric_history(run_dir)


def test_async_save_from_gpu_memory_keeps_the_values_of_the_save_moment(tmp_path: Path) -> None:
    """The device-to-host copies are ordered before the training that follows the save call returning."""
    torch.manual_seed(0)
    weights = torch.randn(64, 1024, 1024, device="cuda")  # 256 MiB, so the copy takes a while
    expected = weights.cpu()
    manager = CheckpointManager(tmp_path / "ckpt", async_save=True)
    path = manager.save({"model": {"w": weights}, "step": 1}, epoch=0, step=1)
    weights.mul_(0).add_(7)  # the next optimizer step, right after save() returns
    manager.close()
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], expected)
    assert torch.equal(weights[0, 0, :3].cpu(), torch.full((3,), 7.0))


# --------------------------------------------------------------------------------------- FSDP on CUDA
BN_CNN = {"name": "tests.helpers.models:BNConvNet", "num_classes": 3, "channels": 8}
MLP = {"name": "mlp", "num_classes": 3, "hidden": [16, 16]}


@pytest.mark.parametrize("model", ["batchnorm", "mlp"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_precision_matrix_on_the_gpu_trains_and_saves(
    tmp_path: Path, strategy: str, precision: str, model: str
) -> None:
    """README's matrix, CUDA half: each combination trains on GPU 0, writes its checkpoint (FSDP: the default
    async sharded save, which asserted "A CPU backend must be enabled" on NCCL) and evaluates from it."""
    name = f"{strategy}-{precision}-{model}"
    cfg = gpu_config(
        tmp_path,
        name,
        model=BN_CNN if model == "batchnorm" else MLP,
        train={"epochs": 2, "precision": precision, "strategy": strategy, "max_steps_per_epoch": 10},
    )
    run_dir = tmp_path / "run"
    proc = dtrain(
        "launch",
        "--gpus",
        "0,",
        "--force",
        str(cfg),
        "--run-dir",
        str(run_dir),
        "--lock-dir",
        str(tmp_path / "locks"),
        cwd=tmp_path,
        env=gpu_env(),
    )
    assert_ok(proc)
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "device cuda:0" in log and f"precision {precision}" in log, log
    if strategy == "fsdp" and model == "batchnorm" and precision != "fp32":
        assert "3 norm layer(s) with running statistics in fp32" in log, log
    epochs = records(run_dir, "epoch")
    assert len(epochs) == 2 and all(r["train/loss"] == r["train/loss"] for r in epochs), epochs
    ckpt = load_final_model(run_dir)
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())
    if precision == "fp16":
        assert ckpt["scaler"]["scale"] > 0
    if strategy == "fsdp":
        assert (run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()).is_dir()
    assert_ok(dtrain("eval", str(run_dir), "--split", "val", cwd=tmp_path, env=gpu_env()))


def test_fsdp_bf16_resnet18_sigterm_resume_bit_exact_then_export_and_eval(tmp_path: Path) -> None:
    """The physicists' default model (ResNet-18: BatchNorm) in bf16 under FSDP on the GPU: trains, stops on
    SIGTERM mid-epoch with a sharded checkpoint, resumes bit-exact (deterministic kernels), and the export
    of its sharded checkpoint evaluates to the run's own numbers."""
    locks = str(tmp_path / "locks")
    data = tmp_path / "img.h5"
    make_image_h5(data, events=600, shape=(3, 16, 16))

    def config(name: str) -> Path:
        return write_config(
            tmp_path / f"{name}.toml",
            data,
            run={"name": name, "output_dir": str(tmp_path / "runs"), "seed": 1, "deterministic": True},
            data={"batch_size": 8},
            model={"name": "tests.helpers.models:SlowResNet18", "num_classes": 3, "delay": 0.02},
            optim={"name": "sgd", "lr": 0.05, "momentum": 0.9},
            train={"epochs": 3, "precision": "bf16", "strategy": "fsdp", "log_every": 1, "stop_check_every": 2},
        )

    ref = tmp_path / "ref"
    assert_ok(
        dtrain(
            "launch",
            "--gpus",
            "0,",
            "--force",
            str(config("ref")),
            "--run-dir",
            str(ref),
            "--lock-dir",
            locks,
            cwd=tmp_path,
            env=gpu_env(),
        )
    )
    log = (ref / "logs" / "rank0.log").read_text()
    assert "precision bf16" in log and "norm layer(s) with running statistics in fp32" in log, log
    epochs = records(ref, "epoch")
    assert len(epochs) == 3 and epochs[-1]["train/loss"] < epochs[0]["train/loss"], epochs

    run_dir = tmp_path / "cut"
    args = ("launch", "--gpus", "0,", "--force", str(config("cut")), "--run-dir", str(run_dir), "--lock-dir", locks)
    proc = start_dtrain(*args, cwd=tmp_path, env=gpu_env())
    steps_per_epoch = 60  # 480 training samples / 8
    wait_for_step(run_dir, steps_per_epoch + 20, proc, timeout=300)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out
    cut = load_final_model(run_dir)
    assert cut["reason"] == "preempt" and not cut["epoch_complete"], "the stop must land mid-epoch"
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest.is_dir() and verify_sharded_checkpoint(latest) is None, "a sharded checkpoint"
    assert_ok(dtrain(*args, cwd=tmp_path, env=gpu_env()))
    assert "resumed from" in (run_dir / "logs" / "rank0.log").read_text()
    assert_same_state(load_final_model(ref), load_final_model(run_dir))
    assert metric_history(ref) == metric_history(run_dir)

    exported = tmp_path / "model.pt"
    assert_ok(dtrain("ckpt", "export", str(run_dir), str(exported), cwd=tmp_path, env=gpu_env()))
    weights = torch.load(exported, weights_only=True)["model"]
    final = load_final_model(run_dir)["model"]
    assert weights.keys() == final.keys() and all(torch.equal(weights[k], final[k]) for k in final)
    from_run = dtrain("eval", str(run_dir), "--split", "val", "--json", cwd=tmp_path, env=gpu_env())
    from_file = dtrain("eval", str(exported), "--split", "val", "--json", cwd=tmp_path, env=gpu_env())
    assert_ok(from_run)
    assert_ok(from_file)
    # The same weights; two processes may still pick different cuDNN kernels for the bf16 convolutions.
    run_metrics, file_metrics = json.loads(from_run.stdout), json.loads(from_file.stdout)
    assert file_metrics["val/loss"] == pytest.approx(run_metrics["val/loss"], rel=1e-3)
    assert file_metrics["val/samples"] == run_metrics["val/samples"] == 60


def test_async_sharded_save_from_gpu_memory_keeps_the_values_of_the_save_moment(tmp_path: Path) -> None:
    """DCP's staging copies device to host (pinned buffers, non-blocking copies): what is written is the
    state when save() returned, although the next optimizer step changes it at once."""
    torch.manual_seed(0)
    weights = torch.randn(64, 1024, 1024, device="cuda")  # 256 MiB, so the copy takes a while
    moments = torch.randn(16, 1024, 1024, device="cuda")
    expected = {"w": weights.cpu(), "m": moments.cpu()}
    manager = ShardedCheckpointManager(tmp_path / "ckpt", rank=0, group=None, async_save=True)
    common = {"epoch": 0, "step": 1, "world_size": 1, "config": {}}
    for step in (1, 2):  # the second save reuses the stager's pinned buffers
        state = {"model": {"w": weights}, "optimizer": {"state": {"m": moments}}}
        path = manager.save(state, common, {"meter": {}}, epoch=0, step=step)
        weights.mul_(0).add_(7 * step)  # the next optimizer step, right after save() returns
        moments.mul_(0).add_(-step)
        manager.wait()
        assert path is not None and verify_sharded_checkpoint(path) is None
        whole = consolidate(path, optimizer=True)
        assert torch.equal(whole["model"]["w"], expected["w"]), step
        assert torch.equal(whole["optimizer"]["state"]["m"], expected["m"]), step
        expected = {"w": weights.cpu(), "m": moments.cpu()}
    manager.close()
    assert torch.equal(weights[0, 0, :3].cpu(), torch.full((3,), 14.0))


@pytest.mark.parametrize("channels_last", [False, True])
def test_device_feed_side_stream_equals_the_host_path(tmp_path: Path, channels_last: bool) -> None:
    """uint8 channels-last batches from pinned memory: copied on the side stream, widened, permuted and normalised
    there while the compute stream is busy, then read on the compute stream: the host path's float32 batches, bit
    for bit (and channels_last memory format when asked)."""
    path = write_feed_h5(tmp_path / "f.h5", "uint8", "channels_last")
    cfg = feed_config(path, "channels_last")
    host, _ = feed_batches(cfg)  # the CPU path: normalised on the host
    sent, prep = feed_batches(cfg, device_type="cuda")
    assert prep is not None and sent[0]["x"].dtype == torch.uint8 and sent[0]["x"].is_pinned()
    device = torch.device("cuda", 0)
    feed = DeviceFeed(device, prep, channels_last=channels_last)
    assert isinstance(feed.streams, CudaStreams)
    busy = torch.randn(2048, 2048, device=device)
    for want, batch in zip(host, sent, strict=True):
        for _ in range(20):  # keeps the compute stream busy while the side stream copies
            busy = torch.tanh(busy @ busy)
        out = feed(batch)
        assert out["x"].device == device and out["x"].dtype == torch.float32
        assert out["x"].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        got = {k: (v * 1).cpu() for k, v in out.items()}  # read by a kernel on the compute stream, then copied back
        del out  # freed with pending use on the compute stream: record_stream keeps the memory from the side stream
        assert torch.equal(got["x"], want["x"])
        assert all(torch.equal(got[k], want[k]) for k in ("y", "index", "energies"))
    torch.cuda.synchronize()
