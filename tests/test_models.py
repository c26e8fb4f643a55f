"""Model registry: every model builds and runs on its data shape; kwargs, stems and errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from dist_train.config import ModelConfig
from dist_train.errors import ConfigError
from dist_train.models import build_model, list_models

WCH5_SHAPE = (16, 40, 38)

# A small shape each registered model must handle (spatial models need images).
REGISTERED_SHAPES: dict[str, tuple[int, ...]] = {
    "mlp": (1, 28, 28),
    "simple_mlp": WCH5_SHAPE,
    "cnn": (1, 28, 28),
}


def _build(name: str, shape: tuple[int, ...], num_classes: int = 5, **kwargs: object) -> nn.Module:
    return build_model(ModelConfig(name=name, num_classes=num_classes, kwargs=dict(kwargs)), shape)


def _forward(model: nn.Module, shape: tuple[int, ...], batch: int = 3) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn((batch, *shape)))


def test_every_registered_model_is_covered_here() -> None:
    assert set(list_models(include_torchvision=False)) == set(REGISTERED_SHAPES)


@pytest.mark.parametrize("name", sorted(REGISTERED_SHAPES))
def test_registered_model_builds_and_gives_logits(name: str) -> None:
    shape = REGISTERED_SHAPES[name]
    out = _forward(_build(name, shape, num_classes=7), shape)
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("name", "shape"),
    [("cnn", WCH5_SHAPE), ("cnn", (1, 24, 24)), ("cnn", (28, 28)), ("mlp", WCH5_SHAPE), ("simple_mlp", (1, 28, 28))],
)
def test_sizes_follow_the_data_shape(name: str, shape: tuple[int, ...]) -> None:
    assert _forward(_build(name, shape, num_classes=3), shape).shape == (3, 3)


def test_simple_mlp_is_the_tutorial_architecture() -> None:
    model = _build("simple_mlp", WCH5_SHAPE, num_classes=3)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16 * 40 * 38, 160), (160, 40), (40, 3)]


def test_mlp_hidden_and_dropout_kwargs() -> None:
    model = _build("mlp", (1, 28, 28), num_classes=10, hidden=[64, 32], dropout=0.25)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 64), (64, 32), (32, 10)]
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.25, 0.25]


def test_mlp_default_is_784_128_10() -> None:
    model = _build("mlp", (1, 28, 28), num_classes=10)
    sizes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert sizes == [(784, 128), (128, 10)]


def test_cnn_infers_channels_and_flattened_size() -> None:
    model = _build("cnn", WCH5_SHAPE, num_classes=3)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(16, 32, (5, 5)), (32, 64, (5, 5))]
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    # 40x38 -> conv 36x34 -> pool 18x17 -> conv 14x13 -> pool 7x6
    assert head.in_features == 64 * 7 * 6


def test_init_is_deterministic_under_manual_seed() -> None:
    def build() -> dict[str, torch.Tensor]:
        torch.manual_seed(123)
        return _build("cnn", (1, 28, 28)).state_dict()

    first, second = build(), build()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    torch.manual_seed(124)
    other = _build("cnn", (1, 28, 28)).state_dict()
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_dry_forward_leaves_mode_and_buffers_alone() -> None:
    model = _build("resnet18", (3, 32, 32), num_classes=4, small_input=True)
    assert model.training
    bn = model.bn1
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert int(bn.num_batches_tracked) == 0


def test_resnet18_small_input_stem() -> None:
    default = _build("resnet18", (3, 32, 32), num_classes=10)
    small = _build("resnet18", (3, 32, 32), num_classes=10, small_input=True)
    assert default.conv1.kernel_size == (7, 7) and default.conv1.stride == (2, 2)
    assert isinstance(default.maxpool, nn.MaxPool2d)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    assert _forward(small, (3, 32, 32), batch=2).shape == (2, 10)
    assert default.fc.out_features == 10


def test_resnet18_adapts_to_sixteen_input_channels() -> None:
    model = _build("resnet18", WCH5_SHAPE, num_classes=3)
    assert model.conv1.in_channels == 16
    assert model.conv1.kernel_size == (7, 7)
    assert _forward(model, WCH5_SHAPE, batch=2).shape == (2, 3)


def test_explicit_in_channels_for_torchvision() -> None:
    model = _build("resnet18", (2, 32, 32), num_classes=3, in_channels=2, small_input=True)
    assert model.conv1.in_channels == 2


def test_other_torchvision_classifier_by_name() -> None:
    model = _build("mobilenet_v3_small", (1, 32, 32), num_classes=6)
    assert _forward(model, (1, 32, 32), batch=2).shape == (2, 6)


def test_list_models_includes_torchvision() -> None:
    names = list_models()
    assert {"mlp", "simple_mlp", "cnn", "resnet18", "resnet50"} <= set(names)


def test_import_path_with_kwargs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "my_models_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            class Tiny(nn.Module):
                def __init__(self, sample_shape, num_classes, width=8):
                    super().__init__()
                    self.width = width
                    self.net = nn.Sequential(nn.Flatten(), nn.Linear(sample_shape[0], width), nn.Linear(width, num_classes))

                def forward(self, x):
                    return self.net(x)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = _build("my_models_pkg.nets:Tiny", (12,), num_classes=4, width=16)
    assert type(model).__name__ == "Tiny" and model.width == 16
    assert _forward(model, (12,)).shape == (3, 4)
    with pytest.raises(ConfigError, match=r"unknown key 'widht'.*Did you mean 'width'"):
        _build("my_models_pkg.nets:Tiny", (12,), num_classes=4, widht=16)


def test_import_path_of_torch_class() -> None:
    model = _build("torch.nn:Linear", (10,), num_classes=4, in_features=10, out_features=4)
    assert isinstance(model, nn.Linear)


def test_unknown_kwarg_names_key_model_and_suggestion() -> None:
    with pytest.raises(ConfigError) as info:
        _build("mlp", (1, 28, 28), hiden=[64])
    msg = str(info.value)
    assert "unknown key 'hiden' in [model] for model 'mlp'" in msg
    assert "Did you mean 'hidden'?" in msg
    assert "Known: hidden, dropout" in msg


def test_unknown_torchvision_kwarg() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'smal_input'.*Did you mean 'small_input'"):
        _build("resnet18", (3, 32, 32), smal_input=True)


def test_unknown_model_name_suggests_close_name() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'simple_mpl'.*Did you mean 'simple_mlp'"):
        _build("simple_mpl", WCH5_SHAPE)
    with pytest.raises(ConfigError, match=r"Did you mean 'resnet18'"):
        _build("resnt18", (3, 32, 32))


def test_bad_import_paths() -> None:
    with pytest.raises(ConfigError, match="cannot import module 'no_such_pkg_xyz.mod'"):
        _build("no_such_pkg_xyz.mod:Net", (4,))
    with pytest.raises(ConfigError, match=r"has no attribute 'Lineer'.*Did you mean 'Linear'"):
        _build("torch.nn:Lineer", (4,))


def test_shape_mismatch_names_model_and_data_shape() -> None:
    with pytest.raises(ConfigError) as info:
        _build("cnn", WCH5_SHAPE, in_channels=1)
    msg = str(info.value)
    assert "model 'cnn' cannot take samples of shape (16, 40, 38)" in msg
    assert "x_key" in msg


def test_imported_model_shape_mismatch() -> None:
    with pytest.raises(ConfigError, match=r"model 'torch.nn:Linear' cannot take samples of shape \(16, 40, 38\)"):
        _build("torch.nn:Linear", WCH5_SHAPE, in_features=10, out_features=5)


def test_a_forward_that_raises_its_own_error_is_reported_as_such_not_as_a_shape_problem() -> None:
    """RaisingMLP's forward raises RuntimeError("boom") itself: its type, message and line, no shape blame."""
    with pytest.raises(ConfigError) as info:
        _build("tests.helpers.models:RaisingMLP", WCH5_SHAPE, in_features=16 * 40 * 38)
    msg = str(info.value)
    models_py = Path(__file__).resolve().parent / "helpers" / "models.py"
    assert msg.startswith(f"model 'tests.helpers.models:RaisingMLP' raised RuntimeError: boom at {models_py}:"), msg
    assert "(in forward: `raise RuntimeError(self.message)`)" in msg
    assert "cannot take samples" not in msg and "(5, 16, 40, 38)" not in msg and "(2, 16, 40, 38)" in msg


def test_a_shape_error_raised_by_torch_inside_a_user_model_names_the_models_line() -> None:
    """The model's Linear gets the wrong width: torch raises, and the model's line that called it is named."""
    with pytest.raises(ConfigError) as info:
        _build("tests.helpers.models:RaisingMLP", WCH5_SHAPE, in_features=10, after=10)
    msg = str(info.value)
    assert msg.startswith("model 'tests.helpers.models:RaisingMLP' cannot take samples of shape (16, 40, 38): "), msg
    assert "RuntimeError: mat1 and mat2 shapes cannot be multiplied" in msg
    assert "models.py:" in msg and "(in forward: `return self.net(x)`)" in msg


def test_image_too_small_for_cnn() -> None:
    with pytest.raises(ConfigError, match=r"model 'cnn' cannot take samples of shape \(1, 8, 8\).*padding"):
        _build("cnn", (1, 8, 8))
    # The advertised fix works.
    assert _forward(_build("cnn", (1, 8, 8), padding=2), (1, 8, 8)).shape == (3, 5)


def test_wrong_number_of_outputs() -> None:
    with pytest.raises(ConfigError, match=r"returns outputs of shape \(2, 4\).*expected \(2, 5\)"):
        _build("torch.nn:Linear", (10,), num_classes=5, in_features=10, out_features=4)


def test_bad_kwarg_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="hidden"):
        _build("mlp", (1, 28, 28), hidden="wide")
    with pytest.raises(ConfigError, match="resnet18"):
        _build("resnet18", (3, 32, 32), groups="x")
