"""Data paths in configs: demo data only where a demo file is named, `--set key=` clears a path,
and the run directory's config.toml holds every data path as an absolute path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dist_train.config import config_from_dict, load_config, make_data_paths_absolute, parse_override
from dist_train.errors import ConfigError
from launcher.cli import main
from tests.helpers.run import REPO, make_image_h5, write_config


def test_an_empty_set_value_clears_a_string_option(tmp_path: Path) -> None:
    assert parse_override("data.split_file=") == (["data", "split_file"], "")
    assert parse_override('data.split_file=""') == (["data", "split_file"], "")
    cfg = write_config(tmp_path / "c.toml", tmp_path / "d.h5", data={"split_file": "splits.npz"})
    assert load_config(cfg).data.split_file == "splits.npz"
    assert load_config(cfg, ["data.split_file="]).data.split_file == ""
    assert load_config(cfg, ['data.split_file=""']).data.split_file == ""
    with pytest.raises(ConfigError, match=r"--set train.epochs=: train.epochs = '' has the wrong type: expected int"):
        load_config(cfg, ["train.epochs="])


def test_cleared_split_file_launches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_image_h5(tmp_path / "d.h5", events=60)
    cfg = write_config(tmp_path / "c.toml", data, data={"split_file": "missing.npz"})
    monkeypatch.chdir(tmp_path)
    assert main(["launch", str(cfg), "--gpus", "cpu", "--dry-run"]) == 2
    assert "missing.npz" in capsys.readouterr().err
    assert main(["launch", str(cfg), "--gpus", "cpu", "--dry-run", "--set", "data.split_file="]) == 0


def test_data_paths_become_absolute_but_h5_groups_stay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict({"data": {"path": "d.h5", "split_file": "s/splits.npz", "geometry_file": "g.npz"}})
    make_data_paths_absolute(cfg)
    d = cfg.data
    assert (d.path, d.split_file, d.geometry_file) == (
        str(tmp_path / "d.h5"),
        str(tmp_path / "s/splits.npz"),
        str(tmp_path / "g.npz"),
    )
    cfg = config_from_dict({"data": {"path": "d.h5", "split_file": "h5:/splits"}})
    make_data_paths_absolute(cfg)
    assert cfg.data.split_file == "h5:/splits"


def test_demo_data_is_never_generated_at_a_mistyped_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config copied from the quickstart whose path to real data is mistyped stops the launch."""
    cfg = tmp_path / "mine.toml"
    shutil.copy(REPO / "configs" / "quickstart.toml", cfg)
    cfg.write_text(cfg.read_text().replace('path = "data/demo_wch5.h5"', 'path = "data/my_evnts.h5"'))
    monkeypatch.chdir(tmp_path)
    for extra in (["--dry-run"], []):
        assert main(["launch", str(cfg), "--gpus", "cpu", *extra]) == 2
        err = capsys.readouterr().err
        assert "data.path " + repr(str(tmp_path / "data" / "my_evnts.h5")) + " does not exist" in err
        assert "generates demo data only at a file name starting with 'demo'" in err
    # The same for a path given with --set.
    assert main(["launch", str(cfg), "--gpus", "cpu", "--set", "data.path=events.h5"]) == 2
    assert (
        not (tmp_path / "data").exists() and not (tmp_path / "events.h5").exists() and not (tmp_path / "runs").exists()
    )
    # The shipped demo path is still generated (a dry run says it would be).
    shutil.copy(REPO / "configs" / "quickstart.toml", cfg)
    assert main(["launch", str(cfg), "--gpus", "cpu", "--dry-run"]) == 0
    assert "a real launch generates 4000 demo events there" in capsys.readouterr().err
