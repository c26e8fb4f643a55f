"""GPU discovery and pure selection on recorded GPU states (tests/gpu_states/*.json); `dtrain gpus`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dist_train.errors import LaunchError
from launcher.gpus import (
    NVML_RECORD_ENV,
    GpuState,
    HolderInfo,
    NvmlBackend,
    RecordedBackend,
    classify,
    get_backend,
    one_gpu_of,
    parse_request,
    plan_selection,
    query_visible,
    single_gpu_request,
    visible_gpus,
)

STATES = Path(__file__).parent / "gpu_states"
THRESHOLDS = {"free_memory_mb": 1024, "free_util_pct": 10}


def backend(name: str) -> RecordedBackend:
    return RecordedBackend(STATES / f"{name}.json")


def plan(name: str, request: str, *, environ: dict[str, str] | None = None, force: bool = False, holders=None):
    gpus = visible_gpus(backend(name), environ or {})
    statuses = classify(gpus, holders=holders, **THRESHOLDS)
    return plan_selection(parse_request(request), statuses, force=force)


def indices(gpus: list[GpuState]) -> list[int]:
    return [g.index for g in gpus]


# ------------------------------------------------------------------ recorded backend, visibility


def test_recorded_backend_reads_every_state_file() -> None:
    counts = {p.stem: len(RecordedBackend(p).snapshot()) for p in STATES.glob("*.json")}
    assert counts["free8"] == 8 and counts["none"] == 0 and counts["mig"] == 4


def test_get_backend_uses_record_env_var() -> None:
    chosen = get_backend({NVML_RECORD_ENV: str(STATES / "free8.json")})
    assert isinstance(chosen, RecordedBackend) and len(chosen.snapshot()) == 8
    assert isinstance(get_backend({}), NvmlBackend)


def test_live_nvml_never_raises_and_explains_an_empty_result() -> None:
    nvml = NvmlBackend()
    gpus = nvml.snapshot()  # on a machine without a driver: [] and a reason; with GPUs: real states
    assert gpus or nvml.why_empty()
    assert all(g.uuid.startswith(("GPU-", "MIG-")) for g in gpus)


@pytest.mark.parametrize("name", ["none", "nvml_error"])
def test_no_gpus_gives_a_reason(name: str) -> None:
    gpus, reason = query_visible(backend(name), {})
    assert gpus == [] and reason
    if name == "nvml_error":
        assert "mismatch" in reason


def test_unreadable_record_is_a_no_gpu_state(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    gpus, reason = query_visible(RecordedBackend(broken), {})
    assert gpus == [] and str(broken) in reason


def test_recorded_state_is_reread_on_every_snapshot(tmp_path: Path) -> None:
    record = tmp_path / "state.json"
    record.write_text((STATES / "all_busy.json").read_text())
    recorded = RecordedBackend(record)
    assert all(g.processes for g in recorded.snapshot())
    record.write_text((STATES / "free8.json").read_text())
    assert len(recorded.snapshot()) == 8


def test_cuda_visible_devices_by_index_and_uuid() -> None:
    uuids = [g.uuid for g in backend("free8").snapshot()]
    assert indices(visible_gpus(backend("free8"), {"CUDA_VISIBLE_DEVICES": "5,2"})) == [2, 5]
    by_uuid = visible_gpus(backend("free8"), {"CUDA_VISIBLE_DEVICES": f"{uuids[6]},{uuids[1][:12]}"})
    assert indices(by_uuid) == [1, 6]
    # CUDA stops at the first invalid entry; "" and SLURM's "NoDevFiles" hide everything.
    assert indices(visible_gpus(backend("free8"), {"CUDA_VISIBLE_DEVICES": "3,-1,4"})) == [3]
    gpus, reason = query_visible(backend("free8"), {"CUDA_VISIBLE_DEVICES": "NoDevFiles"})
    assert gpus == [] and "CUDA_VISIBLE_DEVICES" in reason


def test_cuda_visible_devices_restricts_the_choice() -> None:
    chosen = plan("free8", "2", environ={"CUDA_VISIBLE_DEVICES": "6,7"}).candidates
    assert indices(chosen) == [6, 7]
    with pytest.raises(LaunchError, match="Not enough free GPUs"):
        plan("free8", "3", environ={"CUDA_VISIBLE_DEVICES": "6,7"})
    with pytest.raises(LaunchError, match="matches no visible GPU"):
        plan("free8", "0,", environ={"CUDA_VISIBLE_DEVICES": "6,7"})


# ------------------------------------------------------------------ requests and busy reasons


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1,x", "1,1", ""])
def test_bad_requests_are_launch_errors(bad: str) -> None:
    with pytest.raises(LaunchError):
        parse_request(bad)


def test_gpus_zero_explains_how_to_name_gpu_zero() -> None:
    """`--gpus 0` usually means "GPU 0" (the CUDA_VISIBLE_DEVICES habit): say how to write that."""
    with pytest.raises(LaunchError, match="write '--gpus 0,'"):
        parse_request("0")


def test_request_forms() -> None:
    assert parse_request("AUTO").kind == "auto" and parse_request("cpu").kind == "cpu"
    assert parse_request("3").count == 3
    assert parse_request("0,3").ids == ("0", "3") and parse_request("3,").ids == ("3",)


def test_one_process_requests_take_one_gpu_and_refuse_more() -> None:
    """--debug: `auto` means one free GPU (not all of them); counts and lists above one are refused."""
    auto = single_gpu_request("auto")
    assert auto.kind == "auto" and auto.single and auto.describe() == "one free GPU"
    statuses = classify(visible_gpus(backend("free8"), {}), **THRESHOLDS)
    one = plan_selection(auto, statuses)
    assert one.needed == 1 and not one.take_all and indices(one.candidates)[0] == 0
    assert plan_selection(parse_request("auto"), statuses).take_all, "a normal launch still takes every free GPU"
    busy = plan_selection(auto, classify(visible_gpus(backend("busy_process"), {}), **THRESHOLDS))
    assert not busy.take_all and indices(busy.candidates)[0] == 1  # GPU 0 runs another user's process
    assert single_gpu_request("1").count == 1 and single_gpu_request("3,").ids == ("3",)
    assert single_gpu_request("cpu").kind == "cpu"
    for request, n in (("2", 2), ("0,3", 2), ("8", 8)):
        with pytest.raises(LaunchError, match=rf"asks for {n} GPUs, but --debug runs one process"):
            single_gpu_request(request)
    with pytest.raises(LaunchError, match="not a GPU request"):
        single_gpu_request("two")


def test_a_configured_gpu_request_is_cut_down_to_one_gpu() -> None:
    assert one_gpu_of("4") == "1" and one_gpu_of("1") == "1"
    assert one_gpu_of("2,5") == "2," and one_gpu_of("GPU-abc,GPU-def") == "GPU-abc,"
    assert one_gpu_of("auto") == "auto" and one_gpu_of("cpu") == "cpu"
    assert parse_request(one_gpu_of("2,5")).ids == ("2",)


def test_busy_by_memory() -> None:
    assert indices(plan("busy_memory", "auto").candidates) == [1, 3]
    with pytest.raises(LaunchError) as err:
        plan("busy_memory", "3")
    assert "GPU 0" in str(err.value) and "40000 MiB memory used" in str(err.value)
    assert "GPU 2" in str(err.value) and "2048 MiB" in str(err.value)


def test_busy_by_utilisation_threshold_is_exclusive() -> None:
    assert indices(plan("busy_util", "auto").candidates) == [1, 3]  # 10% is busy, 9% is free
    with pytest.raises(LaunchError, match="97% utilisation"):
        plan("busy_util", "3")


def test_busy_by_process_names_user_pid_and_command() -> None:
    with pytest.raises(LaunchError) as err:
        plan("busy_process", "0,1")
    message = str(err.value)
    assert "pid 4242" in message and "alice" in message and "python train.py --lr 0.1" in message
    assert "--force" in message and "GPU 1" not in message


def test_explicit_busy_gpu_allowed_with_force() -> None:
    assert indices(plan("busy_process", "0,1", force=True).candidates) == [0, 1]
    assert indices(plan("busy_process", "1,3").candidates) == [1, 3]


def test_force_never_takes_another_dtrain_jobs_gpu() -> None:
    gpu1 = backend("busy_process").snapshot()[1]
    holder = HolderInfo(gpu1.uuid, "job-7", "erin", 999, "/runs/x", 0.0)
    with pytest.raises(LaunchError, match="reserved by dtrain job job-7 .user erin, pid 999, run dir /runs/x"):
        plan("busy_process", "1,", force=True, holders={gpu1.uuid: holder})


def test_reserved_gpus_are_skipped() -> None:
    gpus = backend("free8").snapshot()
    holders = {g.uuid: HolderInfo(g.uuid, "job-a", "u", 1, "/r", 0.0) for g in gpus[:6]}
    assert indices(plan("free8", "auto", holders=holders).candidates) == [6, 7]
    with pytest.raises(LaunchError, match="reserved by dtrain job job-a"):
        plan("free8", "3", holders=holders)


def test_mig_instances_are_listed_and_selectable() -> None:
    gpus = backend("mig").snapshot()
    parent, mig0, mig1, plain = gpus
    assert parent.mig_enabled and mig0.mig_parent_uuid == parent.uuid == mig1.mig_parent_uuid
    assert mig0.uuid.startswith("MIG-") and mig0.uuid != mig1.uuid
    free = plan("mig", "auto").candidates
    assert [g.uuid for g in free] == [mig0.uuid, plain.uuid]  # never the MIG parent, never the busy instance
    assert plan("mig", mig0.uuid + ",").candidates == [mig0]
    with pytest.raises(LaunchError, match="MIG enabled"):
        plan("mig", "0,")
    # Naming the MIG-enabled GPU in CUDA_VISIBLE_DEVICES exposes its instances.
    assert [g.uuid for g in visible_gpus(backend("mig"), {"CUDA_VISIBLE_DEVICES": "0"})] == [
        parent.uuid,
        mig0.uuid,
        mig1.uuid,
    ]


def test_no_gpus_plan_errors_for_counts_and_lists() -> None:
    with pytest.raises(LaunchError, match="asked for 2 free GPUs, 0 of 0"):
        plan("none", "2")
    with pytest.raises(LaunchError, match="matches no visible GPU"):
        plan("none", "0,3")


def test_topology_prefers_one_group() -> None:
    # A = 0,2,4,6 and B = 1,3,5,7; busy 1,2,4. Index order would mix the two switches.
    assert indices(plan("topology", "2").candidates[:2]) == [0, 6]
    assert indices(plan("topology", "3").candidates[:3]) == [3, 5, 7]
    assert indices(plan("topology", "4").candidates[:4]) == [3, 5, 7, 0]  # largest group first, then the next


# ------------------------------------------------------------------ dtrain gpus


def run_cli(args: list[str], record: str, tmp_path: Path):
    from launcher.cli import cli

    env = {NVML_RECORD_ENV: str(STATES / f"{record}.json"), "CUDA_VISIBLE_DEVICES": None}  # None: unset
    return CliRunner().invoke(cli, ["gpus", "--lock-dir", str(tmp_path / "locks"), *args], env=env)


def test_dtrain_gpus_json(tmp_path: Path) -> None:
    result = run_cli(["--json"], "busy_process", tmp_path)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [g["free"] for g in data["gpus"]] == [False, True, False, True]
    assert data["gpus"][0]["processes"][0]["user"] == "alice"


def test_dtrain_gpus_thresholds_flags(tmp_path: Path) -> None:
    result = run_cli(["--json", "--free-util-pct", "100"], "busy_util", tmp_path)
    assert [g["free"] for g in json.loads(result.output)["gpus"]] == [True, True, True, True]


def test_dtrain_gpus_table_and_no_gpus(tmp_path: Path) -> None:
    table = run_cli([], "busy_process", tmp_path)
    assert table.exit_code == 0 and "alice: python train.py" in table.output and "free" in table.output
    empty = run_cli([], "none", tmp_path)
    assert empty.exit_code == 0 and empty.output.startswith("no GPUs found (")
    empty_json = run_cli(["--json"], "nvml_error", tmp_path)
    assert empty_json.exit_code == 0 and json.loads(empty_json.output)["gpus"] == []


def test_cli_import_does_not_import_torch() -> None:
    code = "import sys, launcher.cli, launcher.reserve; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
