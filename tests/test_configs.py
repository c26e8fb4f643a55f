"""The example configs load and their models fit their data; the config system's user-facing behaviour."""

from __future__ import annotations

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
from dist_train.data.synth import synth_dataset
from dist_train.data.transforms import BatchTransforms
from dist_train.errors import ConfigError
from dist_train.models import build_model

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
    stored = _layout_shape(cfg)
    train = BatchTransforms(cfg.data.train_transforms, "data.train_transforms").output_shape(stored)
    evaluation = BatchTransforms(cfg.data.eval_transforms, "data.eval_transforms").output_shape(stored)
    return train, evaluation


def test_all_documented_example_configs_exist() -> None:
    names = {p.name for p in CONFIG_FILES}
    assert {"quickstart.toml", "wch5_mlp.toml", "mnist_mlp.toml", "fashion_cnn.toml", "resnet18.toml"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_example_config_loads_and_its_model_fits_the_data(path: Path) -> None:
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
