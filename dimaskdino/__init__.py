"""dimaskdino: a training engine for DI-MaskDINO (detection + instance segmentation)."""

__version__ = "0.1.0"


def build_model(cfg):
    """Build the DI-MaskDINO model described by a `dimaskdino.config.Config`."""
    from dimaskdino.model import build_model as _build_model

    return _build_model(cfg)
