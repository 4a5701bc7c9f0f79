"""Convert an authors' checkpoint (DI-MaskDINO or MaskDINO, ResNet backbone, detectron2 key names)
into an engine checkpoint.

    python -m dimaskdino.convert IN OUT [--preset P] [--categories COCO_JSON] [key=value ...]

IN: a `.pth` holding {"model": state_dict} (what detectron2's Checkpointer writes) or the state dict
itself, or a detectron2 `.pkl` (a pickled dict whose "model" maps names to numpy arrays).
OUT: a new folder, an engine checkpoint (weights only, step 0) that `python -m dimaskdino.evaluate
--checkpoint OUT`, `python -m dimaskdino.predict --checkpoint OUT` and `torchrun -m
dimaskdino.train ... train.resume=OUT` (fine-tuning: fresh optimizer, step 0) load.

The preset defaults to dimaskdino_r50_12ep when the checkpoint has the DI module (`oldm.*` keys),
else maskdino_r50_12ep; the class count and the backbone's stem and block widths are the
checkpoint's; `key=value` overrides change the rest (e.g. a checkpoint trained with other widths). Every key and shape is checked against the engine
model built from that config, and any mismatch is a one-line error naming the checkpoint's key,
with nothing written.

Categories: an authors' checkpoint holds no category map. With --categories, contiguous label i is
the i-th category of that COCO json sorted by id (detectron2's convention, which the authors' COCO
training used); without it, a checkpoint of 80 classes gets COCO 2017's 80 categories and any other
class count ids 1..C. Evaluation checks that the dataset json has the same category ids.

The mapping (besides names): nn.MultiheadAttention's packed in_proj_weight / in_proj_bias split
into q / k / v; the decoder's deformable sampling_offsets and attention_weights get their level
axis reversed (the authors' decoder flattens the levels coarse to fine, the engine fine to
coarse); the decoder layer's norm1 (after cross-attention) and norm2 (after self-attention) swap
places (same shapes: a plain rename would silently swap them); duplicated registrations of one
module (decoder.norm, the bbox_embed lists, oldm.norm / oldm.class_embed / oldm.bbox_embed,
decoder.query_guide_feature_update, decoder.class_embed / mask_embed) are checked equal to the
original and dropped, with criterion.empty_weight (a loss buffer).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from dimaskdino.cli import ArgumentParser
from dimaskdino.config import Config, apply_overrides, config_to_dict, get_preset

PREDICTOR = "sem_seg_head.predictor."
PIXEL_DECODER = "sem_seg_head.pixel_decoder."

# COCO 2017 detection categories: (id, name), in id order (the contiguous labels of an 80-class
# COCO model).
COCO_CATEGORIES = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
    (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"),
    (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"),
    (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"),
    (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"),
    (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"),
    (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"),
    (76, "keyboard"), (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"),
    (89, "hair drier"), (90, "toothbrush"),
)


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message is one line naming the file and key."""


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """detectron2 .pkl files are pickles of dicts of numpy arrays: allow only what those need."""

    _ALLOWED = {
        ("collections", "OrderedDict"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weights file")
        return super().find_class(module, name)


def _as_tensor(path: str, key: str, value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise ConversionError(f"{path}: key '{key}' holds a {type(value).__name__}, not a tensor or array")


def read_authors_state(path: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The model state dict of an authors' checkpoint file (.pth / .pkl), as CPU tensors.
    allow_pickle: load a .pth with full pickle (it can run code: trusted files only), for a
    training checkpoint that also holds detectron2's scheduler state."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                data = _ArraysOnlyUnpickler(f).load()
        else:
            data = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as error:  # any unreadable file: one line, no traceback
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = "" if allow_pickle or path.endswith(".pkl") else "; a trusted training checkpoint with scheduler state needs --allow-pickle"
        raise ConversionError(f"{path}: not a readable checkpoint ({detail}){hint}") from error
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    if not isinstance(data, dict) or not data:
        raise ConversionError(f"{path}: expected a state dict or {{'model': state dict}}, got {type(data).__name__}")
    if all(isinstance(k, str) and k.startswith("module.") for k in data):  # saved from a DDP wrapper
        data = {k[len("module."):]: v for k, v in data.items()}
    return {str(key): _as_tensor(path, key, value) for key, value in data.items()}


# ---------------------------------------------------------------------------------------------
# Key mapping
# ---------------------------------------------------------------------------------------------

# Duplicate registrations of one module in the authors' models: duplicate prefix -> the original.
_DUPLICATES = (
    (r"sem_seg_head\.predictor\.decoder\.norm\.", "sem_seg_head.predictor.decoder_norm."),
    (r"sem_seg_head\.predictor\.bbox_embed\.\d+\.", "sem_seg_head.predictor._bbox_embed."),
    (r"sem_seg_head\.predictor\.decoder\.bbox_embed\.\d+\.", "sem_seg_head.predictor._bbox_embed."),
    (r"sem_seg_head\.predictor\.decoder\.class_embed\.", "sem_seg_head.predictor.class_embed."),
    (r"sem_seg_head\.predictor\.decoder\.mask_embed\.", "sem_seg_head.predictor.mask_embed."),
    (r"sem_seg_head\.predictor\.decoder\.query_guide_feature_update\.", "sem_seg_head.predictor.query_guide_feature_update."),
    (r"sem_seg_head\.predictor\.oldm\.norm\.", "sem_seg_head.predictor.oldm_norm."),
    (r"sem_seg_head\.predictor\.oldm\.class_embed\.", "sem_seg_head.predictor.class_embed."),
    (r"sem_seg_head\.predictor\.oldm\.bbox_embed\.\d+\.", "sem_seg_head.predictor._oldm_bbox_embed."),
    (r"sem_seg_head\.predictor\.oldm_bbox_embed\.\d+\.", "sem_seg_head.predictor._oldm_bbox_embed."),
)
_DROPPED = ("criterion.empty_weight",)

_FFN = (("linear1", "ffn.linear1"), ("linear2", "ffn.linear2"))
_PARAM = r"(weight|bias|running_mean|running_var)"

# (authors' key pattern, engine key template); the first that matches fullmatch wins. {n} are the
# pattern's groups. Attention in_proj keys are split separately.
_RENAMES = [
    # detectron2 ResNet -> torchvision names
    (r"backbone\.stem\.conv1\.weight", "backbone.conv1.weight"),
    (rf"backbone\.stem\.conv1\.norm\.{_PARAM}", "backbone.bn1.{0}"),
    (r"backbone\.res(\d)\.(\d+)\.conv(\d)\.weight", "backbone.layer{stage}.{1}.conv{2}.weight"),
    (rf"backbone\.res(\d)\.(\d+)\.conv(\d)\.norm\.{_PARAM}", "backbone.layer{stage}.{1}.bn{2}.{3}"),
    (r"backbone\.res(\d)\.(\d+)\.shortcut\.weight", "backbone.layer{stage}.{1}.downsample.0.weight"),
    (rf"backbone\.res(\d)\.(\d+)\.shortcut\.norm\.{_PARAM}", "backbone.layer{stage}.{1}.downsample.1.{2}"),
    # pixel decoder
    (r"sem_seg_head\.pixel_decoder\.input_proj\.(\d+)\.(\d+)\.(weight|bias)", "pixel_decoder.input_proj.{0}.{1}.{2}"),
    (r"sem_seg_head\.pixel_decoder\.transformer\.level_embed", "pixel_decoder.level_embed"),
    (r"sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.self_attn\.(\w+)\.(weight|bias)",
     "pixel_decoder.layers.{0}.self_attn.{1}.{2}"),
    (r"sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.norm1\.(weight|bias)", "pixel_decoder.layers.{0}.norm1.{1}"),
    (r"sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.norm2\.(weight|bias)", "pixel_decoder.layers.{0}.ffn.norm.{1}"),
    (r"sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.(linear[12])\.(weight|bias)", "pixel_decoder.layers.{0}.ffn.{1}.{2}"),
    (r"sem_seg_head\.pixel_decoder\.mask_features\.(weight|bias)", "pixel_decoder.mask_features.{0}"),
    (r"sem_seg_head\.pixel_decoder\.adapter_1\.weight", "pixel_decoder.lateral_conv.0.weight"),
    (r"sem_seg_head\.pixel_decoder\.adapter_1\.norm\.(weight|bias)", "pixel_decoder.lateral_conv.1.{0}"),
    (r"sem_seg_head\.pixel_decoder\.layer_1\.weight", "pixel_decoder.output_conv.0.weight"),
    (r"sem_seg_head\.pixel_decoder\.layer_1\.norm\.(weight|bias)", "pixel_decoder.output_conv.1.{0}"),
    # shared heads and the first selection
    (r"sem_seg_head\.predictor\.decoder_norm\.(weight|bias)", "heads.decoder_norm.{0}"),
    (r"sem_seg_head\.predictor\.class_embed\.(weight|bias)", "heads.class_embed.{0}"),
    (r"sem_seg_head\.predictor\._bbox_embed\.layers\.(\d+)\.(weight|bias)", "heads.bbox_embed.layers.{0}.{1}"),
    (r"sem_seg_head\.predictor\.mask_embed\.layers\.(\d+)\.(weight|bias)", "heads.mask_embed.layers.{0}.{1}"),
    (r"sem_seg_head\.predictor\.enc_output\.(weight|bias)", "token_selection.enc_output.{0}"),
    (r"sem_seg_head\.predictor\.enc_output_norm\.(weight|bias)", "token_selection.enc_output_norm.{0}"),
    (r"sem_seg_head\.predictor\.label_enc\.weight", "denoising.label_enc.weight"),
    # DI: token interaction ("oldm") and BATO ("query_guide_feature_update", "mask_output_conv")
    (r"sem_seg_head\.predictor\.oldm\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", "token_interaction.layers.{0}.self_attn.out_proj.{1}"),
    (r"sem_seg_head\.predictor\.oldm\.layers\.(\d+)\.norm1\.(weight|bias)", "token_interaction.layers.{0}.norm1.{1}"),
    (r"sem_seg_head\.predictor\.oldm\.layers\.(\d+)\.norm2\.(weight|bias)", "token_interaction.layers.{0}.ffn.norm.{1}"),
    (r"sem_seg_head\.predictor\.oldm\.layers\.(\d+)\.(linear[12])\.(weight|bias)", "token_interaction.layers.{0}.ffn.{1}.{2}"),
    (r"sem_seg_head\.predictor\.oldm\.ref_point_head\.layers\.(\d+)\.(weight|bias)", "token_interaction.ref_point_head.layers.{0}.{1}"),
    (r"sem_seg_head\.predictor\.oldm_norm\.(weight|bias)", "token_interaction.norm.{0}"),
    (r"sem_seg_head\.predictor\._oldm_bbox_embed\.layers\.(\d+)\.(weight|bias)", "token_interaction.bbox_embed.layers.{0}.{1}"),
    (r"sem_seg_head\.predictor\.query_guide_feature_update\.multihead_attn\.out_proj\.(weight|bias)", "decoder.bato.cross_attn.out_proj.{0}"),
    (r"sem_seg_head\.predictor\.query_guide_feature_update\.norm1\.(weight|bias)", "decoder.bato.norm1.{0}"),
    (r"sem_seg_head\.predictor\.query_guide_feature_update\.norm2\.(weight|bias)", "decoder.bato.ffn.norm.{0}"),
    (r"sem_seg_head\.predictor\.query_guide_feature_update\.(linear[12])\.(weight|bias)", "decoder.bato.ffn.{0}.{1}"),
    (r"sem_seg_head\.predictor\.decoder\.mask_output_conv\.weight", "decoder.bato.mask_feature_conv.0.weight"),
    (r"sem_seg_head\.predictor\.decoder\.mask_output_conv\.norm\.(weight|bias)", "decoder.bato.mask_feature_conv.1.{0}"),
    # decoder: the authors' norm2 follows self-attention (the engine's norm1), norm1 follows
    # cross-attention (the engine's norm2), norm3 the FFN
    (r"sem_seg_head\.predictor\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", "decoder.layers.{0}.self_attn.out_proj.{1}"),
    (r"sem_seg_head\.predictor\.decoder\.layers\.(\d+)\.norm2\.(weight|bias)", "decoder.layers.{0}.norm1.{1}"),
    (r"sem_seg_head\.predictor\.decoder\.layers\.(\d+)\.norm1\.(weight|bias)", "decoder.layers.{0}.norm2.{1}"),
    (r"sem_seg_head\.predictor\.decoder\.layers\.(\d+)\.norm3\.(weight|bias)", "decoder.layers.{0}.ffn.norm.{1}"),
    (r"sem_seg_head\.predictor\.decoder\.layers\.(\d+)\.(linear[12])\.(weight|bias)", "decoder.layers.{0}.ffn.{1}.{2}"),
    (r"sem_seg_head\.predictor\.decoder\.layers\.(\d+)\.cross_attn\.(\w+)\.(weight|bias)", "decoder.layers.{0}.cross_attn.{1}.{2}"),
    (r"sem_seg_head\.predictor\.decoder\.ref_point_head\.layers\.(\d+)\.(weight|bias)", "decoder.ref_point_head.layers.{0}.{1}"),
]
_RENAMES = [(re.compile(pattern), template) for pattern, template in _RENAMES]

# Packed nn.MultiheadAttention projections: authors' prefix -> engine prefix (q_proj, k_proj, v_proj).
_PACKED_ATTENTION = [
    (re.compile(r"sem_seg_head\.predictor\.oldm\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)"), "token_interaction.layers.{0}.self_attn"),
    (re.compile(r"sem_seg_head\.predictor\.decoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)"), "decoder.layers.{0}.self_attn"),
    (re.compile(r"sem_seg_head\.predictor\.query_guide_feature_update\.multihead_attn\.in_proj_(weight|bias)"), "decoder.bato.cross_attn"),
]
_DECODER_LEVEL_AXIS = re.compile(r"decoder\.layers\.\d+\.cross_attn\.(sampling_offsets|attention_weights)\.(weight|bias)")


def _rename(key: str) -> str | None:
    for pattern, template in _RENAMES:
        match = pattern.fullmatch(key)
        if match:
            groups = match.groups()
            stage = int(groups[0]) - 1 if key.startswith("backbone.res") else None
            return template.format(*groups, stage=stage)
    return None


def _authors_key_for(engine_key: str) -> str | None:
    """The authors' key that maps to `engine_key` (for error messages), by running the rename
    table backwards."""
    packed = re.fullmatch(r"(.+)\.[qkv]_proj\.(weight|bias)", engine_key)
    table = [(p, prefix) for p, prefix in _PACKED_ATTENTION] if packed else _RENAMES
    target = packed.group(1) if packed else engine_key
    for pattern, template in table:
        names = []

        def group(match: re.Match) -> str:
            names.append(match.group(1))
            return rf"(?P<g{match.group(1)}>[^.]+)"

        found = re.fullmatch(re.sub(r"\\{(\w+)\\}", group, re.escape(template)), target)
        if found is None:
            continue
        values = {name: found.group(f"g{name}") for name in names}
        if "stage" in values:
            values["0"] = str(int(values["stage"]) + 1)
        if packed:  # the last group of a packed pattern is weight / bias
            values[str(pattern.groups - 1)] = packed.group(2)
        groups = iter(range(pattern.groups))
        source = re.sub(r"\((?:[^()]|\([^()]*\))*\)", lambda m: "{" + str(next(groups)) + "}", pattern.pattern)
        return source.replace("\\.", ".").format(*(values.get(str(i), "?") for i in range(pattern.groups)))
    return None


def _reverse_levels(tensor: torch.Tensor, kind: str, heads: int, levels: int, points: int) -> torch.Tensor:
    """Reverse the level axis of a deformable attention's sampling_offsets / attention_weights
    (rows laid out heads x levels x points (x 2))."""
    per_point = 2 if kind == "sampling_offsets" else 1
    shape = (heads, levels, points * per_point) + tuple(tensor.shape[1:])
    return tensor.reshape(shape).flip(1).reshape(tensor.shape).contiguous()


def authors_to_engine(state: dict[str, torch.Tensor], cfg: Config, path: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(engine state dict, engine key -> the authors' key it came from). Raises ConversionError
    naming the authors' key for an unknown key, a duplicate that differs from its original, or a
    packed projection whose shape cannot be split."""
    converted: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    dec = cfg.model.decoder
    for key, value in state.items():
        if key in _DROPPED or key.endswith(".num_batches_tracked"):
            continue
        duplicate_of = next((re.sub("^" + p, original, key) for p, original in _DUPLICATES if re.match(p, key)), None)
        if duplicate_of is not None:
            original = state.get(duplicate_of)
            if original is not None and (original.shape != value.shape or not torch.equal(original, value)):
                raise ConversionError(f"{path}: key '{key}' should be a copy of '{duplicate_of}' (one shared module) but differs")
            if original is None:
                raise ConversionError(f"{path}: key '{key}' is a copy of '{duplicate_of}', which is missing")
            continue
        packed = next(((p.fullmatch(key), prefix) for p, prefix in _PACKED_ATTENTION if p.fullmatch(key)), None)
        if packed is not None:
            match, prefix = packed
            prefix = prefix.format(*match.groups())
            kind = match.groups()[-1]
            if value.shape[0] % 3 != 0:
                raise ConversionError(f"{path}: key '{key}' has shape {tuple(value.shape)}: not a packed q/k/v projection")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                converted[f"{prefix}.{name}.{kind}"] = part.contiguous()
                source[f"{prefix}.{name}.{kind}"] = key
            continue
        target = _rename(key)
        if target is None:
            raise ConversionError(f"{path}: unexpected key '{key}' (no counterpart in the engine model)")
        level_axis = _DECODER_LEVEL_AXIS.fullmatch(target)
        if level_axis is not None:
            kind = level_axis.group(1)
            expected_rows = dec.num_heads * 4 * dec.num_points * (2 if kind == "sampling_offsets" else 1)
            if value.shape[0] != expected_rows:
                raise ConversionError(
                    f"{path}: key '{key}' has shape {tuple(value.shape)}, expected {expected_rows} rows "
                    f"({dec.num_heads} heads x 4 levels x {dec.num_points} points)"
                )
            value = _reverse_levels(value, kind, dec.num_heads, 4, dec.num_points)
        converted[target] = value
        source[target] = key
    return converted, source


# ---------------------------------------------------------------------------------------------
# Config, check, categories, writing
# ---------------------------------------------------------------------------------------------


def infer_config(state: dict[str, torch.Tensor], preset: str | None, overrides: list[str], path: str) -> Config:
    """The preset (DI-MaskDINO when the checkpoint has the DI module), the checkpoint's class
    count, then the overrides."""
    if preset is None:
        preset = "dimaskdino_r50_12ep" if any(k.startswith(PREDICTOR + "oldm.") for k in state) else "maskdino_r50_12ep"
    class_key = PREDICTOR + "class_embed.weight"
    if class_key not in state:
        raise ConversionError(f"{path}: missing key '{class_key}' (not a DI-MaskDINO / MaskDINO checkpoint)")
    cfg = get_preset(preset)
    model = dataclasses.replace(cfg.model, num_classes=int(state[class_key].shape[0]))
    # The backbone's widths are read off its stem and first block (64 / 64 for a real ResNet).
    stem, first = state.get("backbone.stem.conv1.weight"), state.get("backbone.res2.0.conv1.weight")
    if stem is not None and first is not None:
        model = dataclasses.replace(model, backbone=dataclasses.replace(
            model.backbone, stem_channels=int(stem.shape[0]), base_width=int(first.shape[0])))
    return apply_overrides(dataclasses.replace(cfg, model=model), overrides)


def check_against_model(converted: dict[str, torch.Tensor], source: dict[str, str], cfg: Config, path: str) -> None:
    """Every engine key present with its shape, nothing extra; the first problem raises."""
    from dimaskdino.model import build_model

    with torch.device("meta"):  # shapes only: no memory, no init cost
        expected = build_model(cfg).state_dict()
    for key, tensor in expected.items():
        if key not in converted:
            authors_key = _authors_key_for(key)
            name = f"key '{authors_key}'" if authors_key else "a key"
            raise ConversionError(f"{path}: missing {name} (the engine's '{key}', shape {tuple(tensor.shape)}, "
                                  f"built from the preset with {cfg.model.num_classes} classes)")
        if tuple(converted[key].shape) != tuple(tensor.shape):
            raise ConversionError(f"{path}: key '{source[key]}' has shape {tuple(converted[key].shape)}, "
                                  f"the engine's '{key}' needs {tuple(tensor.shape)}")
    for key in converted:
        if key not in expected:
            raise ConversionError(f"{path}: unexpected key '{source[key]}' (the engine model built from the preset "
                                  f"has no '{key}'; a different layer count or preset?)")


def category_state(num_classes: int, categories_json: str | None) -> dict:
    """{"coco_ids", "names"} of the contiguous labels 0..C-1 (see the module docstring)."""
    if categories_json:
        try:
            with open(categories_json) as f:
                categories = json.load(f)["categories"]
            pairs = sorted((int(c["id"]), str(c["name"])) for c in categories)
        except FileNotFoundError:
            raise
        except (ValueError, KeyError, TypeError) as error:
            raise ConversionError(f"{categories_json}: cannot read 'categories' (id, name) ({error})") from error
        if len(pairs) != num_classes:
            raise ConversionError(f"{categories_json}: {len(pairs)} categories, but the checkpoint has {num_classes} classes")
    elif num_classes == len(COCO_CATEGORIES):
        pairs = list(COCO_CATEGORIES)
    else:
        pairs = [(i + 1, f"class_{i + 1}") for i in range(num_classes)]
    return {"coco_ids": [i for i, _ in pairs], "names": [n for _, n in pairs]}


def write_engine_checkpoint(out: str, state: dict[str, torch.Tensor], cfg: Config, categories: dict, converted_from: str) -> Path:
    """A weights-only engine checkpoint folder (DCP + meta.json), written under OUT.tmp and renamed."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from dimaskdino.checkpoint import META_FILE

    final = Path(out)
    if final.exists():
        raise ConversionError(f"{out}: already exists; choose a new output folder")
    staging = final.with_name(final.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.save({"model": state}, checkpoint_id=str(staging))
    meta = dict(step=0, epoch=0, batch_in_epoch=0, world_size=1, weights_only=True, config=config_to_dict(cfg),
                categories=categories, converted_from=os.path.abspath(converted_from))
    (staging / META_FILE).write_text(json.dumps(meta, indent=1))
    os.replace(staging, final)
    return final


def convert(in_path: str, out_path: str, preset: str | None = None, overrides: list[str] | None = None,
            categories_json: str | None = None, allow_pickle: bool = False) -> Path:
    """Read, map, check, then write; nothing is written unless every check passes."""
    if Path(out_path).exists():
        raise ConversionError(f"{out_path}: already exists; choose a new output folder")
    state = read_authors_state(in_path, allow_pickle)
    cfg = infer_config(state, preset, list(overrides or []), in_path)
    converted, source = authors_to_engine(state, cfg, in_path)
    check_against_model(converted, source, cfg, in_path)
    categories = category_state(cfg.model.num_classes, categories_json)
    return write_engine_checkpoint(out_path, converted, cfg, categories, in_path)


def build_parser() -> argparse.ArgumentParser:
    from dimaskdino.config import PRESETS

    parser = ArgumentParser(prog="python -m dimaskdino.convert",
                                     description="Convert an authors' DI-MaskDINO / MaskDINO checkpoint into an engine checkpoint.")
    parser.add_argument("input", help="the authors' .pth ({'model': state dict} or a state dict) or detectron2 .pkl")
    parser.add_argument("output", help="a new folder for the engine checkpoint")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="default: dimaskdino_r50_12ep if the checkpoint has the DI module, else maskdino_r50_12ep")
    parser.add_argument("--categories", default=None, metavar="COCO_JSON",
                        help="a COCO json whose categories, sorted by id, are the labels 0..C-1 "
                             "(default: COCO 2017's for 80 classes, else ids 1..C)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load a .pth with full pickle (it can run code: only for files you trust), e.g. a "
                             "training checkpoint that also holds detectron2's scheduler state")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (e.g. model.hidden_dim=128)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides may follow the options
    out = convert(args.input, args.output, args.preset, args.overrides, args.categories, args.allow_pickle)
    print(f"wrote {out} (from {args.input})")
    return 0


if __name__ == "__main__":
    from dimaskdino.cli import run_cli

    sys.exit(run_cli(main))
