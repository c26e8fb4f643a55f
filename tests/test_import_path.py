"""Users' modules are imported as the workers import them: from the launch directory first.

One helper (dist_train/import_path.py) serves `dtrain launch`'s custom-task check, `dtrain eval` and
the [model] check; `dtrain eval` and the model check are also covered end to end
(tests/test_configs.py: the README custom-model command; tests/test_model_check.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dist_train.config import Config
from dist_train.errors import ConfigError
from dist_train.import_path import worker_import_path, worker_imports
from launcher.cmd_launch import check_custom_task
from tests.helpers.run import REPO, env_for_tests

TASK_MODULE = """
class LaunchDirTask:
    def loss(self, outputs, batch):
        return outputs.sum()

    def metrics(self, outputs, batch):
        return {"count": outputs.shape[0]}
"""


def test_the_workers_path_starts_with_the_launch_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = worker_import_path()
    assert path[0] == str(tmp_path)
    # `python -m` replaces this process's first entry (the dtrain script's directory) by the launch directory.
    assert path[1:] == sys.path[1:]


def test_worker_imports_import_from_the_launch_directory_and_restore_sys_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "dtrain_launch_dir_module.py").write_text("VALUE = 7\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "dtrain_launch_dir_module", raising=False)
    before = list(sys.path)
    with worker_imports() as path:
        assert path[0] == str(tmp_path)
        import dtrain_launch_dir_module  # type: ignore[import-not-found]

        assert dtrain_launch_dir_module.VALUE == 7
    assert sys.path == before
    monkeypatch.delitem(sys.modules, "dtrain_launch_dir_module")
    with pytest.raises(RuntimeError, match="user code"), worker_imports():
        raise RuntimeError("user code failed")
    assert sys.path == before, "restored after an exception too"


def test_the_launch_check_finds_a_custom_task_in_the_launch_directory_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    launch_dir, elsewhere = tmp_path / "launch", tmp_path / "elsewhere"
    launch_dir.mkdir()
    elsewhere.mkdir()
    (launch_dir / "dtrain_launch_dir_task.py").write_text(TASK_MODULE)
    monkeypatch.delitem(sys.modules, "dtrain_launch_dir_task", raising=False)
    cfg = Config()
    cfg.task.name = "dtrain_launch_dir_task:LaunchDirTask"
    before = list(sys.path)
    # From another directory the workers could not import it either: refused before any worker starts.
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ConfigError, match="cannot import module 'dtrain_launch_dir_task'"):
        check_custom_task(cfg)
    monkeypatch.chdir(launch_dir)
    check_custom_task(cfg)
    assert "dtrain_launch_dir_task" in sys.modules
    assert sys.path == before
    monkeypatch.delitem(sys.modules, "dtrain_launch_dir_task")


def test_the_helper_and_the_launcher_commands_import_no_torch() -> None:
    code = (
        "import sys, dist_train.import_path, dist_train.model_check, dist_train.checkpoint.layout, "
        "launcher.cmd_launch, launcher.slurm, launcher.cmd_eval; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env_for_tests(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
