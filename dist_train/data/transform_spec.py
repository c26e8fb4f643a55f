"""Safe parsing of transform strings such as ``"RandomCrop(24, padding=2)"`` (torch-free).

A config must never run code: each string is parsed with :mod:`ast` and accepted only if it is a
single call of a whitelisted ``torchvision.transforms.v2`` name whose arguments are literals
(numbers, strings, booleans, None, tuples/lists of those). The launcher validates the strings
before any worker starts; :mod:`dist_train.data.transforms` builds the objects in the workers.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any

from dist_train.errors import ConfigError

# Transforms that draw random numbers (seeded per batch) ...
RANDOM_TRANSFORMS = frozenset(
    {
        "RandomCrop",
        "RandomResizedCrop",
        "RandomHorizontalFlip",
        "RandomVerticalFlip",
        "RandomRotation",
        "RandomAffine",
        "RandomPerspective",
        "RandomErasing",
        "GaussianBlur",  # random sigma when a range is given
        "GaussianNoise",
        "RandomInvert",
        "ColorJitter",
    }
)
# ... and deterministic ones (applied to the whole batch at once).
DETERMINISTIC_TRANSFORMS = frozenset({"CenterCrop", "Resize", "Pad"})
ALLOWED_TRANSFORMS = RANDOM_TRANSFORMS | DETERMINISTIC_TRANSFORMS


@dataclass(frozen=True)
class TransformSpec:
    name: str
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]
    text: str

    @property
    def is_random(self) -> bool:
        return self.name in RANDOM_TRANSFORMS


def parse_transform(text: str, where: str = "data.train_transforms") -> TransformSpec:
    def reject(why: str) -> ConfigError:
        return ConfigError(
            f"{where}: {text!r} {why} Write a call of a torchvision.transforms.v2 transform with literal "
            f'arguments, e.g. "RandomCrop(24)". Allowed names: {", ".join(sorted(ALLOWED_TRANSFORMS))}.'
        )

    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise reject("is not valid Python call syntax.") from None
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
        raise reject("is not a plain call such as Name(args).")
    name = call.func.id
    if name not in ALLOWED_TRANSFORMS:
        raise reject(f"uses {name!r}, which is not an allowed transform.")
    try:
        args = tuple(_literal(a) for a in call.args)
        kwargs = tuple((kw.arg, _literal(kw.value)) for kw in call.keywords if kw.arg is not None)
    except (ValueError, TypeError, SyntaxError, RecursionError):
        raise reject("has an argument that is not a literal (numbers, strings, booleans, tuples, lists).") from None
    if any(kw.arg is None for kw in call.keywords):
        raise reject("uses **kwargs, which is not allowed.")
    return TransformSpec(name, args, kwargs, text)


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Starred):
        raise ValueError("starred argument")
    value = ast.literal_eval(node)  # only literals; names, calls and attributes raise ValueError
    if isinstance(value, dict | set | bytes | complex):
        raise ValueError("unsupported literal")
    return value


def parse_transforms(texts: list[str], where: str) -> list[TransformSpec]:
    return [parse_transform(t, f"{where}[{i}]") for i, t in enumerate(texts)]
