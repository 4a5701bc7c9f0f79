"""The DI-MaskDINO model. `build_model(cfg)` is the entry point."""

from dimaskdino.model.dimaskdino import DIMaskDINO, build_model

__all__ = ["DIMaskDINO", "build_model"]
