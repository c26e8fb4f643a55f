"""`[model]` mistakes are found by the launcher before anything starts, and reported once.

The launcher's check reads source (dist_train/model_check.py, no torch); the worker's build_model
runs the same checks on the real objects. Imported factories with ``**kwargs`` get every key.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dist_train.config import ModelConfig
from dist_train.errors import ConfigError
from dist_train.model_check import check_model_config
from tests.helpers.run import REPO, assert_ok, dtrain, make_image_h5, only_run_dir, records, write_config

# make_image_h5's default sample shape (2, 6, 6), flattened.
IN_FEATURES = 72


def output(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def assert_reported_once(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 2, and the console holds the paragraph once: no traceback, no torchrun banner, no doubled '..'."""
    text = output(proc)
    assert proc.returncode == 2, text
    errors = [line for line in text.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("dtrain: error: "), text
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert text.count(needles[0]) == 1, f"{needles[0]!r} shown more than once:\n{text}"
    for banner in ("Traceback", "ChildFailedError", "torch/distributed", "failed (exitcode", "Its log"):
        assert banner not in text, f"{banner!r} on the console:\n{text}"
    assert not re.search(r"(?<!\.)\.\.(?!\.)", text), f"a doubled full stop:\n{text}"
    return errors[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_h5(tmp_path_factory.mktemp("data") / "d.h5", events=120)


# ----------------------------------------------------------------------------------- the static check


def _check(name: str, search_path: list[str] | None = None, **kwargs: object) -> None:
    check_model_config(ModelConfig(name=name, num_classes=3, kwargs=dict(kwargs)), search_path=search_path)


def test_builtin_keys_and_names_are_checked_from_source() -> None:
    _check("mlp", hidden=[8], dropout=0.1)
    _check("cnn", in_channels=1, padding=2, hidden=4, dropout=0.0)
    with pytest.raises(
        ConfigError,
        match=r"unknown key 'num_class' in \[model\] for model 'simple_mlp'\. "
        r"Did you mean 'num_classes'\?",
    ):
        _check("simple_mlp", num_class=3)
    with pytest.raises(ConfigError, match=r"unknown key 'hiden'.*Did you mean 'hidden'\? Known: hidden, dropout\."):
        _check("mlp", hiden=[8])
    with pytest.raises(ConfigError, match=r"unknown model 'simple_mpl'.*Did you mean 'simple_mlp'"):
        _check("simple_mpl")


def test_torchvision_names_and_keys_are_checked_without_importing_torchvision() -> None:
    _check("resnet18", small_input=True, zero_init_residual=True)
    _check("efficientnet_b0", dropout=0.3)  # its own constructor's keyword
    with pytest.raises(ConfigError, match=r"unknown model 'resnt18'.*Did you mean 'resnet18'"):
        _check("resnt18")
    with pytest.raises(ConfigError, match=r"unknown key 'smal_input'.*Did you mean 'small_input'"):
        _check("resnet18", smal_input=True)


def test_the_launcher_and_the_worker_agree_with_torchvision_and_the_registry() -> None:
    """The static registry is the real one: every name and every builder's keys."""
    import inspect

    from dist_train.model_check import builtin_signatures, torchvision_names
    from dist_train.models import _REGISTRY, _torchvision_names

    assert set(builtin_signatures()) == set(_REGISTRY)
    for name, builder in _REGISTRY.items():
        assert builtin_signatures()[name].named == tuple(inspect.signature(builder).parameters)
    assert torchvision_names() == sorted(_torchvision_names())


def _write_module(root: Path, name: str, source: str) -> None:
    (root / f"{name}.py").write_text(textwrap.dedent(source))


def test_imported_module_class_and_keys(tmp_path: Path) -> None:
    _write_module(
        tmp_path,
        "user_nets",
        """
        import torch  # never imported by the check
        from torch import nn

        class Net(nn.Module):
            def __init__(self, num_classes, width=8):
                super().__init__()

        def factory(pretrained=False, **kwargs):
            return Net(**kwargs)

        class Inherits(Net):
            pass

        Alias = Net
    """,
    )
    path = [str(tmp_path)]
    _check("user_nets:Net", path, width=4)
    _check("user_nets:factory", path, anything=1, num_input_channels=38)  # **kwargs: everything goes through
    _check("user_nets:Inherits", path, widht=4)  # inherited constructor: left to the worker
    _check("user_nets:Alias", path, widht=4)  # bound at run time: left to the worker
    with pytest.raises(ConfigError, match=r"unknown key 'widht'.*Did you mean 'width'\? Known: width\."):
        _check("user_nets:Net", path, widht=4)
    with pytest.raises(ConfigError, match=r"has no attribute 'Nett'.*Did you mean 'Net'"):
        _check("user_nets:Nett", path)
    with pytest.raises(ConfigError, match=r"has no attribute 'Inherit'.*Did you mean 'Inherits'"):
        _check("user_nets:Inherit", path)  # a prefix of a name in the module is still not bound
    with pytest.raises(ConfigError, match=r"cannot import module 'user_nets'.*PYTHONPATH"):
        _check("user_nets:Net", [str(tmp_path / "elsewhere")])
    with pytest.raises(ConfigError, match=r"cannot import module 'user_nets.sub'.*'user_nets' is a module"):
        _check("user_nets.sub:Net", path)
    assert "user_nets" not in sys.modules, "the check must not import the user's module"


def test_a_syntax_error_or_a_class_named_only_in_comments_is_found_from_source(tmp_path: Path) -> None:
    _write_module(
        tmp_path,
        "broken_nets",
        """
        import torch

        class Net(torch.nn.Module):
            def __init__(self, num_classes):
                super().__init__(
    """,
    )
    with pytest.raises(ConfigError) as info:
        _check("broken_nets:Net", [str(tmp_path)])
    message = str(info.value)
    assert f"syntax error in {tmp_path / 'broken_nets.py'}, line 6: '(' was never closed" in message, message
    assert "`super().__init__(`" in message
    _write_module(
        tmp_path,
        "commented_nets",
        '''
        """Nets. TODO: EventNet, a bigger model."""
        from torch import nn

        # class EventNet(nn.Module): not written yet
        class SmallNet(nn.Module):
            pass
    ''',
    )
    with pytest.raises(ConfigError, match=r"has no attribute 'EventNet'"):
        _check("commented_nets:EventNet", [str(tmp_path)])
    _write_module(
        tmp_path,
        "dynamic_nets",
        """
        globals()["EventNet"] = object
    """,
    )
    _check("dynamic_nets:EventNet", [str(tmp_path)])  # bound at run time: left to the worker


@pytest.mark.parametrize("mode", ["launch", "dry-run"])
def test_a_model_module_with_a_syntax_error_stops_the_launch_with_file_and_line(
    tmp_path: Path, data: Path, mode: str
) -> None:
    _write_module(
        tmp_path,
        "user_models",
        """
        from torch import nn

        class Net(nn.Module):
            def __init__(self, num_classes, in_features):
                super().__init__(
                self.fc = nn.Linear(in_features, num_classes)
    """,
    )
    write_config(tmp_path / "c.toml", data, model={"name": "user_models:Net", "in_features": IN_FEATURES})
    flags = ["--dry-run"] if mode == "dry-run" else []
    proc = dtrain("launch", "--gpus", "cpu", "c.toml", *flags, cwd=tmp_path)
    line = assert_reported_once(proc, f"syntax error in {tmp_path / 'user_models.py'}, line 6: '(' was never closed")
    assert line.startswith("dtrain: error: c.toml: [model] name = 'user_models:Net': "), line
    assert not (tmp_path / "runs").exists(), "no run directory for a launch that cannot start"


def test_packages_are_found_without_running_their_code(tmp_path: Path) -> None:
    package = tmp_path / "user_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('package code ran')\n")
    _write_module(package, "nets", "def make(width=8):\n    pass\n")
    _check("user_pkg.nets:make", [str(tmp_path)], width=2)
    with pytest.raises(ConfigError, match=r"cannot import module 'user_pkg.netz'"):
        _check("user_pkg.netz:make", [str(tmp_path)])


# ----------------------------------------------------------------------------------- imported factories (issue 11)


def test_an_open_factory_gets_every_key_and_num_classes() -> None:
    """The tutorial's `def resnet18(pretrained=False, **kwargs)`, called as its authors do."""
    import torch

    from dist_train.models import build_model

    cfg = ModelConfig(name="tests.helpers.hk_resnet:resnet18", num_classes=3, kwargs={"num_input_channels": 38})
    check_model_config(cfg, search_path=[str(REPO), *sys.path])
    model = build_model(cfg, (38, 16, 40))
    assert model.conv1.in_channels == 38 and model.fc.out_features == 3
    assert model(torch.zeros(2, 38, 16, 40)).shape == (2, 3)


def test_an_open_factorys_own_error_is_shown_with_the_models_name() -> None:
    from dist_train.models import build_model

    cfg = ModelConfig(name="tests.helpers.hk_resnet:resnet18", num_classes=3, kwargs={"num_input_channel": 38})
    check_model_config(cfg, search_path=[str(REPO), *sys.path])  # open signature: the launcher lets it through
    with pytest.raises(ConfigError) as info:
        build_model(cfg, (38, 16, 40))
    msg = str(info.value)
    assert msg.startswith(
        "model 'tests.helpers.hk_resnet:resnet18' failed when dtrain called it as "
        "resnet18(num_input_channel=38, num_classes=3): TypeError: "
    )
    assert "unexpected keyword argument 'num_input_channel'" in msg


def test_a_closed_signature_keeps_the_unknown_key_check_with_a_hint() -> None:
    from dist_train.models import build_model

    cfg = ModelConfig(
        name="tests.helpers.hk_resnet:ResNet",
        num_classes=3,
        kwargs={"block": None, "layers": [1, 1, 1, 1], "num_input_channel": 38},
    )
    expected = r"unknown key 'num_input_channel'.*Did you mean 'num_input_channels'\?"
    with pytest.raises(ConfigError, match=expected):
        check_model_config(cfg, search_path=[str(REPO), *sys.path])
    with pytest.raises(ConfigError, match=expected):
        build_model(cfg, (38, 16, 40))


def test_the_tutorial_resnet_trains_from_config_alone(tmp_path: Path) -> None:
    data = make_image_h5(tmp_path / "d.h5", events=96, shape=(38, 4, 8))
    cfg = write_config(
        tmp_path / "c.toml",
        data,
        model={"name": "tests.helpers.hk_resnet:resnet18", "num_classes": 3, "num_input_channels": 38},
        train={"epochs": 1, "log_every": 1, "precision": "fp32"},
    )
    proc = dtrain("launch", "--gpus", "cpu", str(cfg), cwd=tmp_path)
    assert_ok(proc)
    assert [r["step"] for r in records(only_run_dir(tmp_path / "runs"), "epoch")] == [5]


# ----------------------------------------------------------------------------------- the launcher (item 1)


@pytest.mark.parametrize(
    ("model", "sets", "needles"),
    [
        (
            {"name": "simple_mlp", "num_class": 3},
            [],
            ["unknown key 'num_class'", "Did you mean 'num_classes'?", "c.toml"],
        ),
        ({"name": "simple_mpl"}, [], ["unknown model 'simple_mpl'", "Did you mean 'simple_mlp'?"]),
        ({"name": "user_models:Net"}, [], ["cannot import module 'user_models'", "PYTHONPATH"]),
        ({"name": "mlp"}, ["--set", "model.x=1"], ["--set model.x=1: unknown key 'x'"]),
        ({"name": "mlp"}, ["--set", "model.name=foo"], ["--set model.name=foo: unknown model 'foo'"]),
    ],
    ids=["key", "name", "import", "set-key", "set-name"],
)
@pytest.mark.parametrize("mode", ["launch", "dry-run", "debug"])
def test_model_mistakes_stop_the_launch_before_anything_starts(
    tmp_path: Path, data: Path, model: dict[str, object], sets: list[str], needles: list[str], mode: str
) -> None:
    write_config(tmp_path / "c.toml", data, model=model)
    flags = {"launch": [], "dry-run": ["--dry-run"], "debug": ["--debug"]}[mode]
    proc = dtrain("launch", "--gpus", "cpu", "c.toml", *sets, *flags, cwd=tmp_path)
    assert_reported_once(proc, *needles)
    assert not (tmp_path / "runs").exists(), "no run directory for a launch that cannot start"


def test_a_custom_model_importable_from_the_launch_directory_passes(tmp_path: Path, data: Path) -> None:
    _write_module(
        tmp_path,
        "user_models",
        """
        from torch import nn

        class Net(nn.Sequential):
            def __init__(self, num_classes, in_features):
                super().__init__(nn.Flatten(), nn.Linear(in_features, num_classes))
    """,
    )
    write_config(tmp_path / "c.toml", data, model={"name": "user_models:Net", "in_features": IN_FEATURES})
    assert_ok(dtrain("launch", "--gpus", "cpu", "c.toml", "--dry-run", cwd=tmp_path))
    # The same directory from elsewhere: the workers could not import it either.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = dtrain("launch", "--gpus", "cpu", str(tmp_path / "c.toml"), "--dry-run", cwd=elsewhere)
    assert_reported_once(proc, "cannot import module 'user_models'")


def test_a_bad_input_error_in_a_worker_is_shown_once(tmp_path: Path, data: Path) -> None:
    """Found only by the workers (the model rejects a key through **kwargs): the paragraph once, exit 2,
    no torchrun failure banner; the rank log and torchrun's log keep the details."""
    cfg = write_config(
        tmp_path / "c.toml",
        data,
        model={"name": "tests.helpers.hk_resnet:resnet18", "num_classes": 3, "num_input_channel": 2},
    )
    proc = dtrain("launch", "--gpus", "cpu", "--nproc", "2", str(cfg), cwd=tmp_path)
    line = assert_reported_once(proc, "unexpected keyword argument 'num_input_channel'")
    assert line.startswith("dtrain: error: model 'tests.helpers.hk_resnet:resnet18' failed when dtrain called it")
    run_dir = only_run_dir(tmp_path / "runs")
    assert "unexpected keyword argument 'num_input_channel'" in (run_dir / "logs" / "rank0.log").read_text()
    assert "failed (exitcode: 2)" in (run_dir / "launcher" / "torchrun.log").read_text()

    # --verbose: torchrun's own lines and the worker's traceback reach the console too.
    verbose = dtrain(
        "--verbose", "launch", "--gpus", "cpu", "--nproc", "2", "--resume", "never", str(cfg), cwd=tmp_path
    )
    assert verbose.returncode == 2
    assert "failed (exitcode: 2)" in output(verbose) and "Traceback" in output(verbose)


def test_a_bad_input_error_in_a_debug_run_has_no_traceback(tmp_path: Path, data: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", data, model={"name": "cnn", "num_classes": 3})  # 6x6 images: too small
    proc = dtrain("launch", "--debug", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2, output(proc)
    assert "Traceback" not in output(proc)
    assert output(proc).count("model 'cnn' cannot take samples of shape (2, 6, 6)") == 1, output(proc)
