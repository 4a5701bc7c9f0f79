"""Configuration: nested dataclasses, named presets and typed `key=value` overrides.

    cfg = get_preset("dimaskdino_r50_12ep")
    cfg = apply_overrides(cfg, ["model.hidden_dim=128", "train.lr=2e-4", "model.di.enabled=false"])

Every preset is its base preset with a few fields edited (`_edit`), so the differences between
presets are visible in one place. Modules never read the config: the build functions do, and pass
explicit constructor arguments.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

# Schedules (SPEC section 5) are given in iterations at batch 16; 88,500 iterations are 12 epochs,
# so one epoch is 7,375 iterations and the steps below are exact epoch fractions.
_ITERS_PER_EPOCH_AT_BATCH_16 = 88_500 / 12


def _epochs(iterations: int) -> float:
    return iterations / _ITERS_PER_EPOCH_AT_BATCH_16


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


@dataclass
class BackboneConfig:
    depth: int = 50  # ResNet 18 / 34 / 50 (torchvision layouts and parameter names)
    # Local path to a torchvision `resnet50` (or resnet18/34) state dict; "" = random init.
    weights: str = ""
    # "frozen_bn" (SPEC: frozen BatchNorm, loads torchvision weights) or "group_norm"
    # (GroupNorm(32) with trainable affine, for training from scratch: with frozen BN and no
    # pretrained statistics a ResNet has no normalization at all).
    norm: str = "frozen_bn"
    # Stem output channels and first-stage block width (doubled per stage): 64 in every published
    # ResNet (and what torchvision weights need); smaller only for tiny test models (the
    # authors'-code fixtures: detectron2 STEM_OUT_CHANNELS, WIDTH_PER_GROUP).
    stem_channels: int = 64
    base_width: int = 64


@dataclass
class EncoderConfig:
    """The pixel decoder's multi-scale deformable encoder (SPEC section 1)."""

    num_layers: int = 6
    num_heads: int = 8
    num_points: int = 4
    dim_feedforward: int = 2048


@dataclass
class DecoderConfig:
    num_layers: int = 6  # MaskDINO uses 9
    num_heads: int = 8
    num_points: int = 4
    dim_feedforward: int = 2048


@dataclass
class DIConfig:
    """De-Imbalance module: token interaction over the first selection, then a second selection
    (SPEC section 3). Off: one selection of `model.num_queries` tokens straight into the decoder."""

    enabled: bool = True
    num_first_selection: int = 600  # k1
    num_ti_layers: int = 2
    num_heads: int = 8
    dim_feedforward: int = 2048


@dataclass
class BATOConfig:
    """Balance-aware tokens optimization (SPEC section 4), run between decoder layers 0 and 1."""

    enabled: bool = True
    num_guiding_tokens: int = 50
    num_heads: int = 8
    dim_feedforward: int = 2048


@dataclass
class DenoisingConfig:
    enabled: bool = True
    num_queries: int = 100  # groups = num_queries // (max GT per image)
    label_noise_prob: float = 0.2
    box_noise_scale: float = 0.4
    # Over which images "max GT per image" is taken: "process" (the images of one process's batch,
    # as the authors' per-GPU batch) or "global" (the whole global batch, all processes: the
    # groups then do not depend on how the batch is split over processes).
    max_gt_scope: str = "process"


@dataclass
class ModelConfig:
    num_classes: int = 80
    hidden_dim: int = 256
    num_queries: int = 300  # queries entering the decoder (k2 with DI on)
    mask_enhanced_boxes: bool = True  # replace the selected boxes by the boxes of their masks
    # Boxes of the first-selection masks (mask-enhanced boxes): "authors" (their masks_to_boxes:
    # corners at the min and max pixel indices, no +1; an empty mask gives their degenerate box,
    # x0 = y0 = 1e8, x1 = y1 = 0, which the eps-clamped inverse sigmoid maps to a zero-size box
    # at the corner (1, 1)) or "pixel_edges" (the engine's former boxes: x1 = last index + 1,
    # detectron2's BitMasks convention, and an empty mask keeps the token's selected box).
    mask_box_style: str = "authors"
    # Encoder proposal sizes w = h = 0.05 * 2^i: "authors" (i counts levels coarsest first, their
    # FEATURE_ORDER low2high: 0.4 at stride 8 ... 0.05 at stride 64) or "by_stride" (i counts
    # finest first: 0.05 at stride 8 ... 0.4 at stride 64, DINO's order and the engine's former one).
    proposal_sizes: str = "authors"
    pixel_mean: tuple[float, ...] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, ...] = (58.395, 57.12, 57.375)
    size_divisibility: int = 32  # input H, W are padded up to a multiple of this
    # Mask outputs in training: "full" (B, Q, H/4, W/4) logits for every output (the reference),
    # "points" (mask embeddings + features; the matcher and criterion make logits only at their
    # sampled points: no Q x H x W tensor), "auto" (points on a CUDA device, full elsewhere).
    train_masks: str = "auto"
    # True: training also zeroes the padding outside each image's valid region (the engine's
    # former behaviour). The authors' model sees the LSJ padding (pixel 128, normalized) in
    # training; evaluation pads with the mean colour either way.
    zero_train_padding: bool = False
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    di: DIConfig = field(default_factory=DIConfig)
    bato: BATOConfig = field(default_factory=BATOConfig)
    denoising: DenoisingConfig = field(default_factory=DenoisingConfig)


# ---------------------------------------------------------------------------------------------
# Loss, training, data
# ---------------------------------------------------------------------------------------------


@dataclass
class LossConfig:
    class_weight: float = 4.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    mask_bce_weight: float = 5.0
    dice_weight: float = 5.0
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    cost_class: float = 4.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    cost_mask: float = 5.0
    cost_dice: float = 5.0


@dataclass
class TrainConfig:
    lr: float = 1e-4
    weight_decay: float = 0.05
    backbone_lr_mult: float = 0.1
    clip_grad_norm: float = 0.01
    batch_size: int = 16
    epochs: float = 12  # may be fractional: the schedule is in steps, ceil(epochs x steps per epoch)
    lr_drop_epochs: tuple[float, ...] = (_epochs(81_125),)  # = 11
    # Mixed precision on a GPU (dimaskdino/amp.py). "bf16" (default): bf16 autocast for training
    # and evaluation. "fp16": the authors' recipe: fp16 autocast with dynamic loss scaling, the pixel
    # decoder, TI layers and decoder layers in fp32, evaluation in fp32. "fp32": no autocast.
    amp: str = "bf16"
    warmup_iters: int = 0  # linear warmup from 0.001 x lr; the authors have none (factor 1.0)
    seed: int = 0
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda"
    output_dir: str = "outputs/run"
    resume: str = "auto"  # "auto": the latest checkpoint in output_dir if any; "": start fresh; or a path
    max_steps: int = 0  # > 0 stops early (tests, smoke runs); the schedule still follows `epochs`
    log_period: int = 10  # steps between log records (each one reduces the losses over processes)
    checkpoint_period: int = 500  # steps; a checkpoint is also written at the end
    keep_checkpoints: int = 2
    # A step whose loss or gradient norm is not finite is skipped (no optimizer update) and
    # counted; this many in a row stop the run (naming the last checkpoint, all written finite).
    max_bad_steps: int = 20
    eval_period: int = 0  # steps; 0 = only at the end; < 0 = never (no metrics, no picture)
    eval_batch_size: int = 4
    num_picture_images: int = 4  # val images in predictions.png
    deterministic: bool = False  # torch.use_deterministic_algorithms (exact resume tests)
    # Extra training methods (SPEC section 6): training only, off by default, no inference cost.
    # Co-DETR collaborative hybrid assignment: one-to-many auxiliary heads ("atss", "rcnn") on the
    # encoder pyramid; their positive boxes become extra query groups through the shared decoder
    # with fixed targets. Loss keys "hybrid/<head>/..." (the heads) and "hybrid/<head>/dec<i>/..."
    # (their queries in each decoder layer).
    hybrid_heads: tuple[str, ...] = ()
    # The positive queries also get mask losses (beyond the paper, which is box-only). Experimental:
    # it lowered AP in the README's demo-scale comparison.
    hybrid_masks: bool = False
    hybrid_max_positives: int = 300  # per head and image; padded with negatives
    hybrid_aux_weight: float = 2.0  # the auxiliary heads' losses
    hybrid_query_weight: float = 1.0  # the positive queries' losses, per decoder layer
    # Instance-unique querying (arXiv 2210.00911). inter_scene: every query's mask logits on a queue
    # of pixel embeddings from other images' instances are pushed to 0 (focal), key
    # "inter_scene/focal". equivariance: a second view (flip + crop) of each image, trained with
    # the usual losses ("equi/<output>/<term>") plus feature equivariance ("equi/features").
    inter_scene: bool = False
    inter_scene_queue_size: int = 100_000  # entries (all processes' samples)
    inter_scene_pixels_per_instance: int = 50
    inter_scene_max_instances: int = 32  # instance slots sampled per image and step
    inter_scene_weight: float = 5.0  # as mask_bce_weight: it is a BCE-type term on foreign pixels
    equivariance: bool = False
    equivariance_weight: float = 3.0  # of "equi/features"
    equivariance_min_scale: float = 0.5  # crop side of the second view, as a fraction


@dataclass
class DataConfig:
    image_size: int = 1024
    min_scale: float = 0.1
    max_scale: float = 2.0
    test_short_side: int = 800
    test_max_size: int = 1333
    # COCO-format json + image folder; all four empty = the embedded synthetic dataset, generated
    # on first use into cache_dir (default ~/.cache/dimaskdino, or $DIMASKDINO_CACHE).
    train_json: str = ""
    train_images: str = ""
    val_json: str = ""
    val_images: str = ""
    loader: str = "dali"  # "dali", or "torch": the documented plain-PyTorch fallback
    num_threads: int = 2  # DALI CPU threads per process
    cache_dir: str = ""
    synthetic_seed: int = 0
    synthetic_train: int = 300
    synthetic_val: int = 50
    synthetic_size: tuple[int, int] = (320, 320)


@dataclass
class Config:
    impl: str = "auto"  # op implementation for every op: "auto" / "ref" / "cpu" / "cuda" / ...
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


def _edit(cfg: Config, **changes: Any) -> Config:
    """A copy of `cfg` with dotted fields changed: `_edit(cfg, **{"model.di.enabled": False})`."""
    cfg = copy.deepcopy(cfg)
    for key, value in changes.items():
        *sections, name = key.split(".")
        target = cfg
        for section in sections:
            target = getattr(target, section)
        if not any(f.name == name for f in dataclasses.fields(target)):
            raise KeyError(f"preset edit: unknown key '{key}'")
        setattr(target, name, value)
    return cfg


def _dimaskdino_r50_12ep() -> Config:
    return Config()


def _dimaskdino_r50_24ep() -> Config:
    return _edit(_dimaskdino_r50_12ep(), **{"train.epochs": 24, "train.lr_drop_epochs": (_epochs(147_500),)})


def _dimaskdino_r50_50ep() -> Config:
    return _edit(
        _dimaskdino_r50_12ep(),
        **{"train.epochs": 50, "train.lr_drop_epochs": (_epochs(327_778), _epochs(355_092))},
    )


def _as_maskdino(cfg: Config) -> Config:
    """The MaskDINO baseline: 9 decoder layers, one selection of 300 tokens, no TI, no BATO."""
    return _edit(cfg, **{"model.decoder.num_layers": 9, "model.di.enabled": False, "model.bato.enabled": False})


def _maskdino_r50_12ep() -> Config:
    return _as_maskdino(_dimaskdino_r50_12ep())


def _maskdino_r50_50ep() -> Config:
    return _as_maskdino(_dimaskdino_r50_50ep())


def _demo() -> Config:
    """Small DI-MaskDINO (every DI part present) for the synthetic dataset on a CPU, sized so that
    `torchrun -m dimaskdino.train` trains and evaluates within 15 minutes on 2 cores. Departures
    from the COCO recipe, each for training from scratch in minutes: no pretrained backbone (GroupNorm,
    and the full lr for it), milder scale jitter (0.5-1.5) on 256x256 images, 1,024 loss points,
    a 10-step warmup (3x the COCO lr on freshly initialized weights), and three of the engine's
    former choices where the authors' lost AP at this scale (README "Training", demo figure):
    proposal sizes growing with the stride, pixel-edge mask boxes that keep the selected box where
    a mask is empty, and zeroed LSJ padding."""
    return _edit(
        _dimaskdino_r50_12ep(),
        **{
            "model.num_classes": 10,  # training sets it from the dataset json (6 for the synthetic one)
            "model.hidden_dim": 64,
            "model.num_queries": 50,
            "model.backbone.depth": 18,
            "model.backbone.norm": "group_norm",
            "model.encoder.num_layers": 2,
            "model.encoder.num_heads": 4,
            "model.encoder.num_points": 2,
            "model.encoder.dim_feedforward": 256,
            "model.decoder.num_layers": 3,
            "model.decoder.num_heads": 4,
            "model.decoder.num_points": 2,
            "model.decoder.dim_feedforward": 256,
            "model.di.num_first_selection": 100,
            "model.di.num_heads": 4,
            "model.di.dim_feedforward": 256,
            "model.bato.num_guiding_tokens": 10,
            "model.bato.num_heads": 4,
            "model.bato.dim_feedforward": 256,
            "model.denoising.num_queries": 50,
            "model.proposal_sizes": "by_stride",
            "model.mask_box_style": "pixel_edges",
            "model.zero_train_padding": True,
            "loss.num_points": 1024,
            "train.batch_size": 2,
            "train.lr": 3e-4,
            "train.backbone_lr_mult": 1.0,  # the 0.1 of SPEC is for a pretrained backbone
            # 10 epochs (1,500 steps): 11 took 17 minutes on the 2-core machine (steps after about
            # the 1,000th cost half as much again as the first ones, at the same shapes), 9.5 lost
            # 0.005 segm AP (README, demo figure).
            "train.epochs": 10,
            "train.lr_drop_epochs": (8.5,),
            "train.clip_grad_norm": 0.1,
            "train.warmup_iters": 10,
            "train.checkpoint_period": 1000,
            "data.image_size": 256,
            "data.min_scale": 0.5,
            "data.max_scale": 1.5,
            "data.test_short_side": 256,
            "data.test_max_size": 256,
            "data.synthetic_size": (256, 256),
        },
    )


PRESETS: dict[str, Callable[[], Config]] = {
    "dimaskdino_r50_12ep": _dimaskdino_r50_12ep,
    "dimaskdino_r50_24ep": _dimaskdino_r50_24ep,
    "dimaskdino_r50_50ep": _dimaskdino_r50_50ep,
    "maskdino_r50_12ep": _maskdino_r50_12ep,
    "maskdino_r50_50ep": _maskdino_r50_50ep,
    "demo": _demo,
}


def get_preset(name: str) -> Config:
    """A fresh copy of the named preset."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset '{name}'; valid presets: {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """Plain JSON-able dict (checkpoints, config.json)."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict, cls: type = Config, where: str = "config") -> Any:
    """Inverse of `config_to_dict`; unknown keys raise with their dotted path (a checkpoint from
    a newer version), missing keys take the defaults (an older one)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise KeyError(f"{where}.{key}: unknown config key; valid keys: {', '.join(hints)}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = config_from_dict(value, annotation, f"{where}.{key}")
        elif typing.get_origin(annotation) is tuple:
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse_scalar(text: str, kind: type, key: str) -> Any:
    text = text.strip()
    if kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"override '{key}': expected a boolean (true/false), got '{text}'")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            # "1e3" is a fine way to write an integer as long as it is one.
            try:
                number = float(text)
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
            raise ValueError(f"override '{key}': expected an int, got '{text}'") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"override '{key}': expected a float, got '{text}'") from None
    if kind is str:
        # Quotes are optional: model.backbone.weights=/path and ="" both work.
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            return text[1:-1]
        return text
    raise TypeError(f"override '{key}': fields of type {kind} cannot be set from the command line")


def _parse_value(text: str, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            item_types = None
            item_type = args[0]
        else:
            item_types = args
            item_type = None
        body = text.strip()
        if body[:1] in "([" and body[-1:] in ")]":
            body = body[1:-1]
        items = [part for part in (p.strip() for p in body.split(",")) if part]
        if item_types is not None and len(items) != len(item_types):
            raise ValueError(f"override '{key}': expected {len(item_types)} values, got {len(items)} in '{text}'")
        types_ = item_types if item_types is not None else [item_type] * len(items)
        return tuple(_parse_scalar(item, t, key) for item, t in zip(items, types_))
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"override '{key}': union-typed fields are not supported")
    return _parse_scalar(text, annotation, key)


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """A copy of `cfg` with each `section.field=value` applied; values are parsed by the field's
    type (int, float, bool, str, tuples). Unknown keys and unparsable values raise with the list
    of valid keys of that section."""
    cfg = copy.deepcopy(cfg)
    for override in overrides:
        if "=" not in override:
            raise ValueError(f"override '{override}': expected key=value")
        key, text = override.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        target: Any = cfg
        path = []
        for depth, part in enumerate(parts):
            hints = typing.get_type_hints(type(target))
            section_name = ".".join(path) or "<top level>"
            if part not in hints:
                raise KeyError(f"unknown config key '{key}': section '{section_name}' has no '{part}'"
                               f"{_did_you_mean(part, hints, path)}; valid keys: {', '.join(hints)}")
            annotation = hints[part]
            is_section = dataclasses.is_dataclass(annotation)
            last = depth == len(parts) - 1
            if last and is_section:
                valid = ", ".join(typing.get_type_hints(annotation))
                raise KeyError(f"config key '{key}' is a section, not a value; its keys: {valid}")
            if not last and not is_section:
                raise KeyError(f"config key '{key}': '{'.'.join(parts[: depth + 1])}' is a value, not a section")
            if last:
                setattr(target, part, _parse_value(text, annotation, key))
            else:
                target = getattr(target, part)
                path.append(part)
    validate(cfg)
    return cfg


def _did_you_mean(name: str, valid: typing.Iterable[str], path: list[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean '{'.'.join([*path, close[0]])}'?)" if close else ""


# Lower bounds of the numeric train fields: (minimum, inclusive). Every train field that is a
# number must appear here (a test checks), so a new field gets a bound when it is added.
_TRAIN_BOUNDS: dict[str, tuple[float, bool]] = {
    "lr": (0.0, False), "weight_decay": (0.0, True), "backbone_lr_mult": (0.0, True),
    "clip_grad_norm": (0.0, False), "batch_size": (1, True), "epochs": (0.0, False),
    "warmup_iters": (0, True), "seed": (0, True), "max_steps": (0, True), "log_period": (1, True),
    "checkpoint_period": (0, True), "keep_checkpoints": (0, True), "max_bad_steps": (1, True),
    "eval_period": (-1, True), "eval_batch_size": (1, True), "num_picture_images": (0, True),
    "hybrid_max_positives": (1, True), "hybrid_aux_weight": (0.0, True), "hybrid_query_weight": (0.0, True),
    "inter_scene_queue_size": (1, True), "inter_scene_pixels_per_instance": (1, True),
    "inter_scene_max_instances": (1, True), "inter_scene_weight": (0.0, True), "equivariance_weight": (0.0, True),
    "equivariance_min_scale": (0.0, False),
}


def _numeric_errors(cfg: Config) -> list[str]:
    """Every float in the config is finite (an override can say nan or inf); every numeric train
    field is within its bound."""
    errors = []

    def visit(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                visit(value, f"{key}.")
                continue
            values = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                errors.append(f"{key} must be finite, got {value}")

    visit(cfg, "")
    for name, (minimum, inclusive) in _TRAIN_BOUNDS.items():
        value = getattr(cfg.train, name)
        if not math.isfinite(value):
            continue  # reported above
        if value < minimum or (value == minimum and not inclusive):
            errors.append(f"train.{name} must be {'>=' if inclusive else '>'} {minimum}, got {value}")
    if any(e < 0 for e in cfg.train.lr_drop_epochs):
        errors.append(f"train.lr_drop_epochs must be >= 0, got {cfg.train.lr_drop_epochs}")
    return errors


def validate(cfg: Config) -> None:
    """Consistency checks that would otherwise fail deep inside module construction."""
    model = cfg.model
    errors = []
    if model.backbone.depth not in (18, 34, 50):
        errors.append(f"model.backbone.depth must be 18, 34 or 50, got {model.backbone.depth}")
    if model.backbone.norm not in ("frozen_bn", "group_norm"):
        errors.append(f"model.backbone.norm must be 'frozen_bn' or 'group_norm', got '{model.backbone.norm}'")
    for name in ("stem_channels", "base_width"):
        value = getattr(model.backbone, name)
        if value < 1 or (model.backbone.norm == "group_norm" and value % 32 != 0):
            errors.append(f"model.backbone.{name} must be positive (a multiple of 32 with group_norm), got {value}")
    if model.hidden_dim % 32 != 0:
        errors.append(f"model.hidden_dim must be a multiple of 32 (GroupNorm(32)), got {model.hidden_dim}")
    for name, heads in (
        ("model.encoder.num_heads", model.encoder.num_heads),
        ("model.decoder.num_heads", model.decoder.num_heads),
        ("model.di.num_heads", model.di.num_heads),
        ("model.bato.num_heads", model.bato.num_heads),
    ):
        if heads <= 0 or model.hidden_dim % heads != 0:
            errors.append(f"{name}={heads} must divide model.hidden_dim={model.hidden_dim}")
    if model.hidden_dim % 4 != 0:
        errors.append("model.hidden_dim must be divisible by 4 (sine box embedding)")
    if model.num_classes <= 0:
        errors.append(f"model.num_classes must be positive, got {model.num_classes}")
    if model.num_queries <= 0:
        errors.append(f"model.num_queries must be positive, got {model.num_queries}")
    if model.di.enabled and model.di.num_first_selection < model.num_queries:
        errors.append(
            f"model.di.num_first_selection={model.di.num_first_selection} must be >= "
            f"model.num_queries={model.num_queries} (the second selection picks from the first)"
        )
    if model.di.enabled and model.di.num_ti_layers < 1:
        errors.append("model.di.num_ti_layers must be >= 1 when DI is enabled")
    if model.bato.enabled and model.decoder.num_layers < 2:
        errors.append("BATO runs between decoder layers 0 and 1: model.decoder.num_layers must be >= 2")
    if model.bato.enabled and not 0 < model.bato.num_guiding_tokens <= model.num_queries:
        errors.append("model.bato.num_guiding_tokens must be in [1, model.num_queries]")
    if model.decoder.num_layers < 1 or model.encoder.num_layers < 0:
        errors.append("model.decoder.num_layers must be >= 1 and model.encoder.num_layers >= 0")
    if len(model.pixel_mean) != 3 or len(model.pixel_std) != 3:
        errors.append("model.pixel_mean and model.pixel_std need 3 values (RGB)")
    if model.train_masks not in ("auto", "full", "points"):
        errors.append(f"model.train_masks must be 'auto', 'full' or 'points', got '{model.train_masks}'")
    if model.denoising.max_gt_scope not in ("process", "global"):
        errors.append(f"model.denoising.max_gt_scope must be 'process' or 'global', got '{model.denoising.max_gt_scope}'")
    if model.mask_box_style not in ("authors", "pixel_edges"):
        errors.append(f"model.mask_box_style must be 'authors' or 'pixel_edges', got '{model.mask_box_style}'")
    if model.proposal_sizes not in ("authors", "by_stride"):
        errors.append(f"model.proposal_sizes must be 'authors' or 'by_stride', got '{model.proposal_sizes}'")
    if model.size_divisibility < 1:
        errors.append("model.size_divisibility must be >= 1")
    train = cfg.train
    errors.extend(_numeric_errors(cfg))
    if train.amp not in ("bf16", "fp16", "fp32"):
        errors.append(f"train.amp must be 'bf16', 'fp16' or 'fp32', got '{train.amp}'")
    unknown_heads = [h for h in train.hybrid_heads if h not in ("atss", "rcnn")]
    if unknown_heads or len(set(train.hybrid_heads)) != len(train.hybrid_heads):
        errors.append(f"train.hybrid_heads must be distinct names from (atss, rcnn), got {','.join(train.hybrid_heads)}")
    if train.hybrid_masks and not train.hybrid_heads:
        errors.append("train.hybrid_masks needs train.hybrid_heads (e.g. train.hybrid_heads=atss,rcnn)")
    if train.equivariance_min_scale > 1.0:  # > 0 is a bound above
        errors.append(f"train.equivariance_min_scale must be in (0, 1], got {train.equivariance_min_scale}")
    if errors:
        raise ValueError("invalid config: " + "; ".join(errors))
