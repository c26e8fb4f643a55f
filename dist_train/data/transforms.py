"""Batch augmentation with torchvision.transforms.v2, seeded per batch (torch).

Random transforms run per sample (each image gets its own crop/flip, as in the usual per-sample
pipeline) under ``torch.random.fork_rng`` seeded from ``IndexBatch.seed``: the result depends only
on the batch, not on which loader worker reads it or on the global RNG state, and the caller's
RNG is left untouched. Deterministic transforms (CenterCrop, Resize, Pad) run on the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dist_train.data.transform_spec import TransformSpec, parse_transforms
from dist_train.errors import ConfigError


def build_transform(spec: TransformSpec) -> Callable[[torch.Tensor], torch.Tensor]:
    # torchvision takes about a second to import: only runs with transforms configured pay for it.
    from torchvision.transforms import v2

    cls = getattr(v2, spec.name, None)
    if cls is None:
        raise ConfigError(f"{spec.text!r}: torchvision.transforms.v2 has no {spec.name!r} in this torchvision version.")
    try:
        return cls(*spec.args, **dict(spec.kwargs))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{spec.text!r}: invalid arguments for {spec.name}: {exc}") from None


class BatchTransforms:
    """A list of transform strings applied to an (B, C, H, W) batch; picklable (rebuilt lazily)."""

    def __init__(self, texts: list[str], where: str = "data.train_transforms") -> None:
        self.texts = list(texts)
        self.where = where
        self.specs = parse_transforms(self.texts, where)
        self._built: list[Callable[[torch.Tensor], torch.Tensor]] | None = None

    def __bool__(self) -> bool:
        return bool(self.specs)

    def __getstate__(self) -> dict[str, object]:
        return {"texts": self.texts, "where": self.where}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["texts"], state["where"])  # type: ignore[misc, arg-type]

    @property
    def is_random(self) -> bool:
        return any(s.is_random for s in self.specs)

    def _transforms(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        if self._built is None:
            self._built = [build_transform(s) for s in self.specs]
        return self._built

    def __call__(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        if not self.specs:
            return x
        if x.ndim < 3:
            raise ConfigError(
                f"{self.where}: image transforms need samples of shape (C, H, W), but the samples have shape "
                f"{tuple(x.shape[1:])}. Remove the transforms for this dataset."
            )
        transforms = self._transforms()
        if not self.is_random:
            return _apply_all(transforms, x)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return torch.stack([_apply_all(transforms, sample) for sample in x])

    def output_shape(self, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The sample shape after the transforms (checks that they work on such samples)."""
        if not self.specs:
            return sample_shape
        probe = torch.zeros((1, *sample_shape))
        try:
            return tuple(self(probe, seed=0).shape[1:])
        except ConfigError:
            raise
        except Exception as exc:  # torchvision raises many types for a wrong input shape
            raise ConfigError(
                f"{self.where} = {self.texts} cannot be applied to samples of shape {sample_shape}: {exc}"
            ) from None


def _apply_all(transforms: list[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    for t in transforms:
        x = t(x)
    return x
