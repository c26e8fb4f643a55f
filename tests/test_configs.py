"""The example configs load and their models fit their data; the config system's user-facing behaviour."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dist_train.config import (
    Config,
    ModelConfig,
    OptimConfig,
    config_to_toml,
    load_config,
    parse_override,
    save_config,
)
from dist_train.data.preflight import channels_first_shape
from dist_train.data.transforms import BatchTransforms
from dist_train.data.writers.synth import synth_dataset
from dist_train.errors import ConfigError
from dist_train.model_check import check_model_config
from dist_train.models import build_model
from tests.helpers.run import REPO, assert_ok, dtrain, env_for_tests, only_run_dir, records

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.toml"))
WCH5_SHAPE = (16, 40, 38)
DEFAULT_IMAGE_SHAPE = (1, 28, 28)


def _layout_shape(cfg: Config) -> tuple[int, ...]:
    """The stored sample shape the config implies, without opening the data file."""
    if cfg.data.format == "hits":  # built from hits with the demo geometry: 19 PMTs per module, 16x40 modules
        if cfg.data.representation == "mpmt_image":
            return (19 * len(cfg.data.channels or ["charge", "time"]), 16, 40)
        return (8 if not cfg.data.channels else len(cfg.data.channels), cfg.data.n_points)
    if cfg.data.synth_if_missing == "image":
        return tuple(cfg.data.synth_shape) or DEFAULT_IMAGE_SHAPE
    return WCH5_SHAPE


def _model_input_shapes(cfg: Config) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(train, eval) sample shapes after the data pipeline's own transforms."""
    stored = channels_first_shape(_layout_shape(cfg), cfg.data.layout)
    train = BatchTransforms(cfg.data.train_transforms, "data.train_transforms").output_shape(stored)
    evaluation = BatchTransforms(cfg.data.eval_transforms, "data.eval_transforms").output_shape(stored)
    return train, evaluation


def test_all_documented_example_configs_exist() -> None:
    names = {p.name for p in CONFIG_FILES}
    assert {
        "quickstart.toml",
        "wch5_mlp.toml",
        "mnist_mlp.toml",
        "fashion_cnn.toml",
        "resnet18.toml",
        "custom_model.toml",
    } <= names
    assert {"wch5_energy.toml", "wch5_multitarget.toml", "tutorial_cnn.toml", "wch5_custom_task.toml"} <= names


@pytest.mark.parametrize(
    "path", [p for p in CONFIG_FILES if load_config(p).data.synth_if_missing], ids=lambda p: p.name
)
def test_example_config_builds_its_task_and_model_on_its_demo_data(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Data, task and model as a worker builds them, on a small file of the config's demo layout."""
    from dist_train.data.loader import build_data
    from dist_train.tasks import build_model_for_task, build_task

    monkeypatch.syspath_prepend(str(CONFIG_DIR))  # custom_model.toml's my_models.py, as PYTHONPATH=configs
    cfg = load_config(path)
    cfg.data.path = str(tmp_path / "demo.h5")
    if cfg.data.format == "hits":
        cfg.data.geometry_file = str(tmp_path / "demo_geometry.npz")  # written by synth beside demo.h5
    shape = tuple(cfg.data.synth_shape) or None
    synth_dataset(cfg.data.path, layout=cfg.data.synth_if_missing, events=64, shape=shape, progress=False)
    cfg.data.num_workers = 0
    data = build_data(cfg, run_dir=tmp_path)
    task = build_task(cfg, data)
    model = build_model_for_task(cfg, data, task)
    sample = data.val[list(range(4))]
    outputs = model(sample["x"])
    assert outputs.shape == (4, task.output_width or cfg.model.num_classes)
    assert task.loss(outputs, sample).ndim == 0


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_example_config_loads_and_its_model_fits_the_data(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Example models ("my_models:EventCNN") live beside the configs, launched with PYTHONPATH=configs.
    monkeypatch.syspath_prepend(str(CONFIG_DIR))
    cfg = load_config(path)
    train_shape, eval_shape = _model_input_shapes(cfg)
    # The model sees training and evaluation batches, so both pipelines must give one shape.
    assert train_shape == eval_shape, f"{path.name}: train transforms give {train_shape}, eval {eval_shape}"
    model = build_model(cfg.model, eval_shape)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_example_config_keys_match_the_files_dtrain_writes(path: Path, tmp_path: Path) -> None:
    """A tiny file of the config's layout has its x_key/y_key with the shape the models were checked on."""
    import h5py

    cfg = load_config(path)
    layout = cfg.data.synth_if_missing or "wch5"
    shape = tuple(cfg.data.synth_shape) or None
    if cfg.data.format == "hits":
        from dist_train.data.hits import HitReader, hit_spec

        geometry = tmp_path / "tiny_geometry.npz"
        data = synth_dataset(tmp_path / "tiny.h5", layout="hits", events=4, geometry_path=geometry, progress=False)
        spec = hit_spec(cfg.data, geometry)
        assert spec is not None
        with h5py.File(data, "r") as f:
            assert cfg.data.y_key in f and all(key in f for key in cfg.data.hit_keys.values()), list(f)
        assert HitReader(data, spec).sample_shape() == _layout_shape(cfg)
        return
    data = synth_dataset(tmp_path / "tiny.h5", layout=layout, events=4, shape=shape, progress=False)
    with h5py.File(data, "r") as f:
        assert cfg.data.x_key in f and cfg.data.y_key in f, f"{path.name}: keys {list(f)}"
        assert f[cfg.data.x_key].shape[1:] == _layout_shape(cfg)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_example_config_explains_itself(path: Path) -> None:
    comments = [line for line in path.read_text().splitlines() if line.lstrip().startswith("#") or " # " in line]
    assert len(comments) >= 5, f"{path.name} should explain its choices in comments"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_example_config_survives_save_and_reload(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    out = tmp_path / "resolved.toml"
    save_config(cfg, out)
    assert load_config(out) == cfg


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_example_config_passes_the_launchers_model_check(path: Path) -> None:
    check_model_config(load_config(path).model, search_path=[str(CONFIG_DIR), *sys.path])


def test_quickstart_is_the_small_demo() -> None:
    cfg = load_config(CONFIG_DIR / "quickstart.toml")
    d = cfg.data
    assert (d.path, d.synth_if_missing, d.synth_events) == ("data/demo_wch5.h5", "wch5", 4000)
    assert (d.batch_size, d.val_split, d.test_split, d.num_workers) == (64, 0.1, 0.1, 2)
    assert (cfg.model.name, cfg.model.num_classes) == ("simple_mlp", 3)
    assert (cfg.optim.name, cfg.optim.lr, cfg.train.epochs) == ("adam", 1e-3, 3)


def test_fashion_cnn_crops_to_24() -> None:
    cfg = load_config(CONFIG_DIR / "fashion_cnn.toml")
    assert _model_input_shapes(cfg) == ((1, 24, 24), (1, 24, 24))
    assert (cfg.sched.name, cfg.sched.monitor) == ("plateau", "val/loss")


def test_resnet18_recipe() -> None:
    cfg = load_config(CONFIG_DIR / "resnet18.toml")
    assert _layout_shape(cfg) == (3, 32, 32)
    assert cfg.model.kwargs == {"small_input": True}
    assert (cfg.optim.name, cfg.optim.momentum, cfg.optim.nesterov) == ("sgd", 0.9, True)
    assert cfg.sched.name == "cosine" and cfg.sched.warmup_epochs > 0


def test_overrides_change_an_example_config() -> None:
    cfg = load_config(CONFIG_DIR / "quickstart.toml", ["train.epochs=1", "model.num_classes=5", "launch.gpus=cpu"])
    assert (cfg.train.epochs, cfg.model.num_classes, cfg.launch.gpus) == (1, 5, "cpu")


# ----------------------------------------------------------------------------- config system


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return path


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    path = _write(tmp_path, "[train]\nepoch = 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg and "unknown key 'epoch' in [train]" in msg and "Did you mean 'epochs'?" in msg


def test_unknown_section_suggests_the_right_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown section \[optimizer\].*Did you mean 'optim'"):
        load_config(_write(tmp_path, "[optimizer]\nlr = 0.1\n"))


def test_wrong_type_names_key_expected_value_and_file(tmp_path: Path) -> None:
    path = _write(tmp_path, '[train]\nepochs = "three"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg and "train.epochs" in msg and "'three'" in msg and "expected int" in msg


def test_literal_choice_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"optim.name = 'adm'.*Did you mean 'adam'"):
        load_config(_write(tmp_path, '[optim]\nname = "adm"\n'))


def test_int_is_accepted_for_float(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "[optim]\nlr = 1\n"))
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize(
    ("text", "keys", "value"),
    [
        ("train.epochs=3", ["train", "epochs"], 3),
        ("optim.lr=1e-4", ["optim", "lr"], 1e-4),
        ("optim.lr=0.5", ["optim", "lr"], 0.5),
        ('run.name="my run"', ["run", "name"], "my run"),
        ("sched.milestones=[3, 6]", ["sched", "milestones"], [3, 6]),
        ('data.train_transforms=["RandomCrop(24)"]', ["data", "train_transforms"], ["RandomCrop(24)"]),
        ("data.stratify=true", ["data", "stratify"], True),
        ("launch.gpus=cpu", ["launch", "gpus"], "cpu"),  # bare word
        ("launch.gpus=0,1", ["launch", "gpus"], "0,1"),  # bare word with a comma
        ("data.path=/data/file.h5", ["data", "path"], "/data/file.h5"),
        ("model.hidden=[64, 32]", ["model", "hidden"], [64, 32]),
    ],
)
def test_set_override_parsing(text: str, keys: list[str], value: object) -> None:
    parsed_keys, parsed_value = parse_override(text)
    assert parsed_keys == keys
    assert parsed_value == value and type(parsed_value) is type(value)


@pytest.mark.parametrize("text", ["train.epochs", "epochs=3", ".epochs=3", "data.path=[1,", 'run.name="open'])
def test_bad_set_override_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="--set"):
        parse_override(text)


def test_set_override_is_type_checked_and_key_checked(tmp_path: Path) -> None:
    path = _write(tmp_path, "[train]\nepochs = 2\n")
    with pytest.raises(ConfigError, match=r"train.epochs = 'many'.*expected int"):
        load_config(path, ["train.epochs=many"])
    with pytest.raises(ConfigError, match=r"unknown key 'epocs'.*Did you mean 'epochs'"):
        load_config(path, ["train.epocs=3"])
    assert load_config(path, ["train.epochs=7"]).train.epochs == 7


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(tmp_path / "nope.toml")


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[train\nepochs = 3\n"))


def test_cross_field_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="leaves no training data"):
        load_config(_write(tmp_path, "[data]\nval_split = 0.5\ntest_split = 0.5\n"))


def test_config_to_toml_round_trip_with_every_section_changed(tmp_path: Path) -> None:
    cfg = Config()
    cfg.run.name = 'quote " and \\ backslash'
    cfg.data.train_transforms = ["RandomCrop(24, padding=2)"]
    cfg.data.mean, cfg.data.std, cfg.data.normalize = [0.5, 0.25], [1.0, 2.0], "given"
    cfg.model = ModelConfig(name="mlp", num_classes=10, kwargs={"hidden": [64, 32], "dropout": 0.1})
    cfg.optim = OptimConfig(name="adamw", lr=3e-4, kwargs={"amsgrad": True})
    cfg.sched.name, cfg.sched.milestones = "multistep", [2, 4]
    cfg.train.precision, cfg.train.epochs = "bf16", 9
    cfg.log.histograms = True
    cfg.checkpoint.every_minutes = 2.5
    cfg.launch.preempt_signals = ["SIGUSR1"]
    cfg.slurm.sbatch_args = ["--exclusive"]
    path = tmp_path / "saved.toml"
    path.write_text(config_to_toml(cfg))
    reloaded = load_config(path)
    assert reloaded == cfg
    assert reloaded.model.kwargs == {"hidden": [64, 32], "dropout": 0.1}
    assert build_model(reloaded.model, DEFAULT_IMAGE_SHAPE) is not None


def test_set_mistakes_name_the_set_argument_not_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[train]\nepochs = 2\n")
    cases = {
        "train.loss=mse": "--set train.loss=mse: unknown key 'loss' in [train].",
        "train.epocs=3": "--set train.epocs=3: unknown key 'epocs' in [train]. Did you mean 'epochs'?",
        "trian.epochs=3": "--set trian.epochs=3: unknown section [trian]. Did you mean 'train'?",
        "train.epochs=many": "--set train.epochs=many: train.epochs = 'many' has the wrong type: expected int",
        "model.num_classes=x": "--set model.num_classes=x: model.num_classes = 'x' has the wrong type",
    }
    for override, expected in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config(path, [override])
        assert str(info.value).startswith(expected), str(info.value)
        assert str(path) not in str(info.value)
    # A mistake only the combination makes names both.
    with pytest.raises(ConfigError, match=re.escape(f"{path} with --set data.val_split=0.95: data.val_split")):
        load_config(path, ["data.val_split=0.95"])
    # The file's own mistakes still name the file.
    bad = _write(tmp_path, "[train]\nloss = 2\n")
    with pytest.raises(ConfigError, match=re.escape(f"{bad}: unknown key 'loss' in [train]")):
        load_config(bad, ["train.epochs=3"])


def test_a_bad_set_value_in_a_launch_names_the_set_argument(tmp_path: Path) -> None:
    proc = dtrain("launch", str(CONFIG_DIR / "quickstart.toml"), "--set", "train.loss=mse", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("dtrain: error: --set train.loss=mse: unknown key 'loss' in [train]."), proc.stderr
    assert "quickstart.toml" not in proc.stderr and "Traceback" not in proc.stderr


def test_quickstart_comments_say_what_happens() -> None:
    from launcher.run_dirs import new_run_dir

    text = (CONFIG_DIR / "quickstart.toml").read_text()
    cfg = load_config(CONFIG_DIR / "quickstart.toml")
    assert "runs/quickstart/<time>/" in text
    assert new_run_dir(cfg.run.output_dir, cfg.run.name).parent == Path("runs/quickstart")
    assert "only `dtrain eval`" not in text and "test_at_end" in text
    assert cfg.train.test_at_end, "every launch evaluates the test split at the end unless told otherwise"


# ----------------------------------------------------------------------------------- your own model (README)


def _code_without_docstrings(source: str) -> str:
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
        ):
            node.body = body[1:] or [ast.Pass()]  # type: ignore[attr-defined]
    return ast.dump(tree)


def test_the_readme_custom_model_is_the_example_in_configs() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Your own model") :]
    python = re.search(r"```python\n(.*?)```", section, re.S)
    toml = re.search(r"```toml\n(.*?)```", section, re.S)
    assert python and toml
    assert _code_without_docstrings(python.group(1)) == _code_without_docstrings(
        (CONFIG_DIR / "my_models.py").read_text()
    )
    model = load_config(CONFIG_DIR / "custom_model.toml").model
    readme_model = ModelConfig(**{"kwargs": {}, **_model_table(toml.group(1))})
    assert readme_model == model
    assert "PYTHONPATH=configs dtrain launch configs/custom_model.toml" in section
    assert (
        "PYTHONPATH=configs dtrain launch configs/custom_model.toml" in (CONFIG_DIR / "custom_model.toml").read_text()
    )


def _model_table(text: str) -> dict[str, object]:
    import tomllib

    table = dict(tomllib.loads(text)["model"])
    fields = {"name", "num_classes"}
    return {k: v for k, v in table.items() if k in fields} | {
        "kwargs": {k: v for k, v in table.items() if k not in fields}
    }


def test_the_readme_custom_model_command_trains_and_evaluates(tmp_path: Path) -> None:
    """The README's command, from a copy of configs/ (small data, one epoch, no end-of-run test)."""
    shutil.copytree(CONFIG_DIR, tmp_path / "configs")
    env = env_for_tests({"PYTHONPATH": os.pathsep.join(["configs", str(REPO)])})
    small = [
        "--set",
        "data.synth_events=160",
        "--set",
        "data.num_workers=0",
        "--set",
        "train.epochs=1",
        "--set",
        "train.test_at_end=false",
    ]
    proc = dtrain("launch", "configs/custom_model.toml", "--gpus", "cpu", *small, cwd=tmp_path, env=env)
    assert_ok(proc)
    run_dir = only_run_dir(tmp_path / "runs")
    assert run_dir.parent == tmp_path / "runs" / "custom_model"
    assert records(run_dir, "epoch") and not records(run_dir, "test"), "test_at_end = false: no test evaluation"
    assert "test:" not in proc.stdout

    # Without configs/ on PYTHONPATH the launcher stops before creating anything, naming the fix.
    bare = env_for_tests({"PYTHONPATH": str(REPO)})
    again = dtrain(
        "launch", "configs/custom_model.toml", "--gpus", "cpu", "--resume", "never", *small, cwd=tmp_path, env=bare
    )
    assert again.returncode == 2 and "cannot import module 'my_models'" in again.stderr and "PYTHONPATH" in again.stderr
    assert len(list((tmp_path / "runs" / "custom_model").iterdir())) == 1

    # `dtrain eval` (the installed script's import path: -P leaves out the current directory) finds a
    # module kept in the directory it runs from, as the workers do.
    shutil.copy(CONFIG_DIR / "my_models.py", tmp_path / "my_models.py")
    evaluated = subprocess.run(
        [sys.executable, "-P", "-m", "launcher.cli", "eval", str(run_dir), "--split", "test", "--json"],
        cwd=tmp_path,
        env=bare,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_ok(evaluated)
    assert '"test/accuracy"' in evaluated.stdout
