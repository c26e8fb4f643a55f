"""GPU reservation with real flock locks and real processes, on recorded GPU states."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dist_train.errors import LaunchError
from launcher.gpus import NVML_RECORD_ENV, RecordedBackend
from launcher.reserve import choose_and_reserve, list_holders, lock_file_name, open_lock_dir

STATES = Path(__file__).parent / "gpu_states"
FREE8 = STATES / "free8.json"
UUIDS8 = [g["uuid"] for g in json.loads(FREE8.read_text())["gpus"]]


def reserve(request: str, lock_dir: Path, state: Path = FREE8, **overrides: Any):
    kwargs: dict[str, Any] = dict(
        free_memory_mb=1024,
        free_util_pct=10,
        lock_dir=str(lock_dir),
        force=False,
        wait=False,
        timeout=None,
        job_id="test-job",
        run_dir="/runs/test",
        environ={},
        backend=RecordedBackend(state),
    )
    kwargs.update(overrides)
    return choose_and_reserve(request, **kwargs)


# ------------------------------------------------------------------ basics


def test_reserve_locks_records_holder_and_releases(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    with reserve("2", locks, job_id="job-42") as first:
        assert len(first.gpus) == 2 and not first.cpu_fallback
        assert first.cuda_visible_devices() == ",".join(g.uuid for g in first.gpus)
        assert stat.S_IMODE(os.stat(locks).st_mode) == 0o1777
        holders = list_holders(str(locks))
        assert set(holders) == {g.uuid for g in first.gpus}
        assert {h.job_id for h in holders.values()} == {"job-42"} and holders[first.gpus[0].uuid].pid == os.getpid()
        with reserve("auto", locks) as rest:
            assert len(rest.gpus) == 6 and not {g.uuid for g in rest.gpus} & {g.uuid for g in first.gpus}
            with pytest.raises(LaunchError, match="free GPU"):
                reserve("1", locks)
    assert list_holders(str(locks)) == {}  # released: records cleared and locks dropped
    with reserve("8", locks) as everything:
        assert len(everything.gpus) == 8


def test_explicit_request_names_the_holding_job(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    with reserve("3,", locks, job_id="alice-run-1", run_dir="/runs/a"):
        with pytest.raises(LaunchError) as err:
            reserve("3,5", locks, force=True)
    assert "GPU 3" in str(err.value) and "alice-run-1" in str(err.value) and "/runs/a" in str(err.value)


def test_no_gpus_auto_falls_back_to_cpu_and_counts_fail(tmp_path: Path) -> None:
    fallback = reserve("auto", tmp_path / "locks", state=STATES / "none.json")
    assert fallback.cpu_fallback and fallback.gpus == [] and fallback.cuda_visible_devices() == ""
    assert fallback.notice.startswith("dtrain: no GPUs found (") and "\n" not in fallback.notice
    for request in ("2", "0,3"):
        with pytest.raises(LaunchError, match="no GPUs found"):
            reserve(request, tmp_path / "locks", state=STATES / "nvml_error.json")
    cpu = reserve("cpu", tmp_path / "locks")
    assert cpu.gpus == [] and not cpu.cpu_fallback


def test_one_process_reservations_lock_one_gpu_each(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    with reserve("auto", locks, single=True, job_id="debug-1", run_dir="/runs/t/1-debug") as first:
        assert [g.index for g in first.gpus] == [0] and not first.cpu_fallback
        assert list_holders(str(locks))[first.gpus[0].uuid].run_dir == "/runs/t/1-debug"
        with reserve("auto", locks, single=True) as second:
            assert [g.index for g in second.gpus] == [1], "the first one is locked"
            with reserve("auto", locks) as rest:
                assert len(rest.gpus) == 6, "single reservations leave the other GPUs free"
    assert list_holders(str(locks)) == {}
    with pytest.raises(LaunchError, match="--debug runs one process"):
        reserve("2", locks, single=True)
    fallback = reserve("auto", locks, single=True, state=STATES / "none.json")
    assert fallback.cpu_fallback and fallback.gpus == [] and fallback.notice.endswith("running on the CPU.")


def test_cuda_visible_devices_limits_reservation(tmp_path: Path) -> None:
    with reserve("auto", tmp_path / "locks", environ={"CUDA_VISIBLE_DEVICES": f"{UUIDS8[4]},7"}) as r:
        assert [g.index for g in r.gpus] == [4, 7]


def test_reads_record_path_from_environment(tmp_path: Path) -> None:
    with reserve(
        "1", tmp_path / "locks", backend=None, environ={NVML_RECORD_ENV: str(STATES / "busy_process.json")}
    ) as r:
        assert [g.index for g in r.gpus] == [1]


def test_dtrain_gpus_shows_the_holding_job(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from launcher.cli import cli

    locks = tmp_path / "locks"
    env = {NVML_RECORD_ENV: str(FREE8), "CUDA_VISIBLE_DEVICES": None}
    with reserve("2,", locks, job_id="job-shown", run_dir="/runs/shown"):
        result = CliRunner().invoke(cli, ["gpus", "--json", "--lock-dir", str(locks)], env=env)
        table = CliRunner().invoke(cli, ["gpus", "--lock-dir", str(locks)], env=env)
    gpus = json.loads(result.output)["gpus"]
    assert [g["reserved_by"] is not None for g in gpus] == [i == 2 for i in range(8)]
    assert gpus[2]["reserved_by"]["job_id"] == "job-shown" and not gpus[2]["free"]
    assert "reserved by dtrain job job-shown" in table.output and "/runs/shown" in table.output


# ------------------------------------------------------------------ --wait


def test_wait_until_a_gpu_frees_up(tmp_path: Path) -> None:
    record = tmp_path / "state.json"
    shutil.copy(STATES / "all_busy.json", record)

    def free_later() -> None:
        time.sleep(1.0)
        tmp = tmp_path / "state.json.tmp"
        shutil.copy(FREE8, tmp)
        os.replace(tmp, record)  # atomic: the poller never reads half a file

    messages: list[str] = []
    writer = threading.Thread(target=free_later)
    writer.start()
    try:
        with reserve(
            "2", tmp_path / "locks", state=record, wait=True, timeout=60, log=messages.append, poll_interval=0.1
        ) as r:
            assert len(r.gpus) == 2
    finally:
        writer.join()
    assert messages and "waiting for 2 free GPUs" in messages[0] and "carol" in messages[0]
    assert len(messages) == len(set(messages))  # repeated only on change (or every 30 s)


def test_wait_times_out(tmp_path: Path) -> None:
    messages: list[str] = []
    with pytest.raises(LaunchError, match="Timed out after 0.3 s"):
        reserve(
            "1",
            tmp_path / "locks",
            state=STATES / "all_busy.json",
            wait=True,
            timeout=0.3,
            log=messages.append,
            poll_interval=0.05,
        )
    assert len(messages) == 1


def test_wait_for_a_gpu_held_by_another_job(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    holder = reserve("8", locks)
    timer = threading.Timer(0.5, holder.release)
    timer.start()
    try:
        with reserve("1", locks, wait=True, timeout=60, log=lambda _: None, poll_interval=0.05) as r:
            assert len(r.gpus) == 1
    finally:
        timer.join()
        holder.release()


# ------------------------------------------------------------------ the race: real processes, real locks


def _race_worker(request: str, lock_dir: str, barrier: Any, results: Any, stop: Any) -> None:
    barrier.wait()
    try:
        reservation = reserve(request, Path(lock_dir), job_id=f"job-{os.getpid()}")
    except LaunchError as exc:
        results.put(("error", str(exc)))
        return
    results.put(("ok", [g.uuid for g in reservation.gpus]))
    stop.wait(120)  # hold the locks until every racer has reported
    reservation.release()


@pytest.mark.parametrize("request_kind", ["1", "auto"])
def test_race_twenty_processes_eight_gpus(tmp_path: Path, request_kind: str) -> None:
    ctx = mp.get_context("fork")
    racers = 20
    barrier, results, stop = ctx.Barrier(racers), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=_race_worker, args=(request_kind, str(tmp_path / "locks"), barrier, results, stop))
        for _ in range(racers)
    ]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=120) for _ in range(racers)]
    finally:
        stop.set()
        for p in procs:
            p.join(60)
    won = [uuids for kind, uuids in outcomes if kind == "ok"]
    errors = [msg for kind, msg in outcomes if kind == "error"]
    taken = [u for uuids in won for u in uuids]
    assert len(taken) == len(set(taken)) == 8 and set(taken) == set(UUIDS8)  # every GPU once, none twice
    if request_kind == "1":
        assert len(won) == 8 and len(errors) == 12
    assert len(won) + len(errors) == racers
    assert all("free GPU" in msg for msg in errors)


# ------------------------------------------------------------------ kernel release on SIGKILL

_HOLDER_SCRIPT = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_reserve import reserve
r = reserve("0,", Path({locks!r}), job_id="doomed-job")
print("locked", flush=True)
time.sleep(600)
"""


def test_sigkilled_holder_frees_the_gpu(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    script = _HOLDER_SCRIPT.format(tests=str(Path(__file__).parent), locks=str(locks))
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(LaunchError, match="doomed-job"):
            reserve("0,", locks)
        assert list_holders(str(locks))[UUIDS8[0]].pid == holder.pid
        holder.send_signal(signal.SIGKILL)
        holder.wait(60)
        assert list_holders(str(locks)) == {}  # a stale record is not a reservation
        with reserve("0,", locks) as r:
            assert r.gpus[0].uuid == UUIDS8[0]
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(60)


# ------------------------------------------------------------------ hostile lock directories


def test_symlinked_lock_file_is_refused_and_not_followed(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    os.close(open_lock_dir(str(locks)))  # type: ignore[arg-type]
    target = tmp_path / "victim.txt"
    target.write_text("precious")
    (locks / lock_file_name(UUIDS8[0])).symlink_to(target)
    with pytest.raises(LaunchError, match="symlink"):
        reserve("0,", locks)
    with pytest.raises(LaunchError, match="symlink"):  # waiting cannot fix a planted file: no wait loop
        reserve("0,", locks, wait=True, timeout=None, log=pytest.fail)
    with pytest.raises(LaunchError, match="symlink"):  # GPU 1 locked first, then released on the error
        reserve("1,0", locks)
    assert target.read_text() == "precious"
    with reserve("1,", locks) as r:  # other GPUs are unaffected
        assert r.gpus[0].index == 1
    assert target.read_text() == "precious"


def test_hardlinked_lock_file_is_refused(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    os.close(open_lock_dir(str(locks)))  # type: ignore[arg-type]
    target = tmp_path / "victim.txt"
    target.write_text("precious")
    os.link(target, locks / lock_file_name(UUIDS8[2]))
    with pytest.raises(LaunchError, match="hard links"):
        reserve("2,", locks)
    assert target.read_text() == "precious"


def test_fifo_lock_file_is_refused_without_hanging(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    os.close(open_lock_dir(str(locks)))  # type: ignore[arg-type]
    os.mkfifo(locks / lock_file_name(UUIDS8[3]))
    with pytest.raises(LaunchError, match="not a regular file"):
        reserve("3,", locks)


def test_symlinked_lock_dir_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o1777)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(LaunchError, match="symlink"):
        reserve("1", link)
    assert list(real.iterdir()) == []


def test_world_writable_lock_dir_without_sticky_bit_is_refused(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o777)
    with pytest.raises(LaunchError, match="sticky"):
        reserve("1", loose)
