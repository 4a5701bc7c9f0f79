"""Optional dependencies: the pyproject extras, imported only where a feature needs them.

The core (model, ops, kernels, config, training step) needs torch, triton, numpy and scipy. A feature
that needs more raises MissingOptionalDependency naming the package and the extra that installs it.
"""

from __future__ import annotations

import importlib

# top-level module -> (pip package, extra of pyproject.toml)
PACKAGES = {
    "pycocotools": ("pycocotools", "data"),
    "PIL": ("pillow", "data"),
    "nvidia": ("nvidia-dali-cuda130", "dali"),
    "tensorboard": ("tensorboard", "train"),
    "tqdm": ("tqdm", "train"),
}


class MissingOptionalDependency(ImportError):
    """An optional package a feature needs is not installed; the message says which extra has it."""


def import_optional(module: str, feature: str):
    """importlib.import_module(module), or MissingOptionalDependency saying what `feature` needs."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package, extra = PACKAGES.get(module.split(".")[0], (module.split(".")[0], "all"))
        raise MissingOptionalDependency(
            f"{feature} needs the optional package {package}, which is not installed ({error}); "
            f"install it with: pip install '{package}' (or the extra: pip install -e '.[{extra}]')"
        ) from error


class LazyModule:
    """A module imported on first attribute access, so that importing the code that uses it never
    fails; `mask_utils = LazyModule("pycocotools.mask", "COCO masks")` then `mask_utils.encode(...)`."""

    def __init__(self, module: str, feature: str):
        self._module, self._feature = module, feature

    def __getattr__(self, name: str):
        return getattr(import_optional(self._module, self._feature), name)

    def __repr__(self) -> str:
        return f"LazyModule({self._module!r})"
