"""detect_slurm_step: only a real job step counts, and every node derives the same rendezvous."""

from __future__ import annotations

import pytest

from dist_train.errors import LaunchError
from launcher.slurm_env import detect_slurm_step, in_slurm_step, rdzv_port_for_job


def _expand(nodelist: str) -> list[str]:
    # A stand-in for `scontrol show hostnames` that knows two list shapes.
    table = {"gpu[07-09]": ["gpu07", "gpu08", "gpu09"], "n1,n2": ["n1", "n2"]}
    return table[nodelist]


def _step_env(**extra: str) -> dict[str, str]:
    # What srun gives a task of a two-node, one-task-per-node step (measured on the test cluster).
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_STEPID": "0",
        "SLURM_PROCID": "1",
        "SLURM_NODEID": "1",
        "SLURM_NNODES": "3",
        "SLURM_JOB_NUM_NODES": "3",
        "SLURM_STEP_NUM_NODES": "3",
        "SLURM_STEP_NUM_TASKS": "3",
        "SLURM_JOB_NODELIST": "gpu[07-09]",
        "SLURM_STEP_NODELIST": "gpu[07-09]",
    }
    env.update(extra)
    return env


def test_outside_slurm_returns_none() -> None:
    assert detect_slurm_step({}) is None
    assert detect_slurm_step({"HOME": "/root", "PATH": "/bin"}) is None


def test_stale_job_variables_in_a_login_shell_are_ignored() -> None:
    # e.g. `salloc` left SLURM_JOB_ID behind, or a user exported it by hand: no step, so no SLURM mode.
    env = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "n1,n2", "SLURM_NNODES": "2"}
    assert detect_slurm_step(env, _expand) is None


def test_the_batch_shell_itself_is_not_a_step() -> None:
    # The batch script has SLURM_PROCID and SLURM_NODEID but no step id (measured on Slurm 22.05).
    env = {
        "SLURM_JOB_ID": "77",
        "SLURM_PROCID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "n1,n2",
        "SLURM_NTASKS": "2",
    }
    assert not in_slurm_step(env)
    assert detect_slurm_step(env, _expand) is None


def test_multi_node_step_gives_rank_master_and_rendezvous() -> None:
    step = detect_slurm_step(_step_env(SLURM_RESTART_COUNT="2"), _expand)
    assert step is not None
    assert (step.job_id, step.nnodes, step.node_rank) == ("4242", 3, 1)
    assert step.master_addr == "gpu07"
    assert step.rdzv_port == rdzv_port_for_job("4242")
    assert step.rdzv_endpoint == f"gpu07:{step.rdzv_port}"
    assert step.restart_count == 2
    assert step.gpus == () and step.nproc_per_node == 0
    assert step.torchrun_args() == [
        "--nnodes=3",
        "--node-rank=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=gpu07:{step.rdzv_port}",
        "--rdzv-id=4242",
    ]


def test_every_node_computes_the_same_rendezvous() -> None:
    steps = [detect_slurm_step(_step_env(SLURM_NODEID=str(r), SLURM_PROCID=str(r)), _expand) for r in range(3)]
    assert all(s is not None for s in steps)
    assert {s.rdzv_endpoint for s in steps if s is not None} == {"gpu07:" + str(rdzv_port_for_job("4242"))}
    assert [s.node_rank for s in steps if s is not None] == [0, 1, 2]


def test_rendezvous_port_depends_on_the_job_and_stays_in_range() -> None:
    ports = {rdzv_port_for_job(str(j)) for j in range(1000, 1100)}
    assert len(ports) == 100
    assert all(20000 <= p < 30000 for p in ports)
    assert rdzv_port_for_job("1234_7") == rdzv_port_for_job("12347")  # array ids are digits too


def test_restart_count_defaults_to_zero() -> None:
    step = detect_slurm_step(_step_env(), _expand)
    assert step is not None and step.restart_count == 0


@pytest.mark.parametrize(
    ("extra", "gpus"),
    [
        ({"CUDA_VISIBLE_DEVICES": "2,3"}, ("2", "3")),
        ({"SLURM_STEP_GPUS": "0,1,2,3"}, ("0", "1", "2", "3")),
        ({"SLURM_GPUS_ON_NODE": "2"}, ("0", "1")),
        ({"CUDA_VISIBLE_DEVICES": "1", "SLURM_STEP_GPUS": "5", "SLURM_GPUS_ON_NODE": "4"}, ("1",)),
        ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, ()),
    ],
)
def test_visible_gpus(extra: dict[str, str], gpus: tuple[str, ...]) -> None:
    step = detect_slurm_step(_step_env(**extra), _expand)
    assert step is not None
    assert step.gpus == gpus and step.nproc_per_node == len(gpus)


def test_single_node_step_needs_no_hostname_lookup() -> None:
    def refuse(nodelist: str) -> list[str]:
        raise AssertionError("no lookup expected")

    env = _step_env(
        SLURM_NNODES="1",
        SLURM_JOB_NUM_NODES="1",
        SLURM_STEP_NUM_NODES="1",
        SLURM_STEP_NUM_TASKS="1",
        SLURM_NODEID="0",
        SLURM_PROCID="0",
        SLURM_JOB_NODELIST="gpu07",
        SLURM_STEP_NODELIST="gpu07",
    )
    step = detect_slurm_step(env, refuse)
    assert step is not None and step.nnodes == 1 and step.master_addr == "127.0.0.1"


def test_the_step_nodelist_wins_over_the_job_nodelist() -> None:
    env = _step_env(SLURM_STEP_NODELIST="n1,n2", SLURM_STEP_NUM_NODES="2", SLURM_STEP_NUM_TASKS="2")
    step = detect_slurm_step(env, _expand)
    assert step is not None and step.master_addr == "n1" and step.nnodes == 2


def test_several_tasks_per_node_is_an_error() -> None:
    with pytest.raises(LaunchError, match="ntasks-per-node=1"):
        detect_slurm_step(_step_env(SLURM_STEP_NUM_TASKS="6"), _expand)


def test_a_garbled_node_id_is_an_error() -> None:
    with pytest.raises(LaunchError, match="SLURM_NODEID"):
        detect_slurm_step(_step_env(SLURM_NODEID="x"), _expand)
    with pytest.raises(LaunchError, match="outside"):
        detect_slurm_step(_step_env(SLURM_NODEID="5"), _expand)


def test_missing_scontrol_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(LaunchError, match="scontrol"):
        detect_slurm_step(_step_env())
