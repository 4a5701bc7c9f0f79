"""Inference weights as safetensors: the format to share.

    python -m dimaskdino.export CHECKPOINT OUT.safetensors

CHECKPOINT is a training checkpoint (a step_XXXXXXXX folder, or a training output folder: its
latest checkpoint). Training checkpoints are torch.distributed.checkpoint folders whose
`.metadata` file is a pickle, so loading one runs code from it: load them only from sources you
trust (your own runs). The export holds only tensors (the model without its training-only parts:
the same weights `checkpoint.load_for_inference` builds) and, as safetensors metadata (JSON
strings), the config and the category map; `load_safetensors_for_inference` reads it back
without any pickle, and `evaluate` / `predict` take such a file as `--checkpoint`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from dimaskdino.cli import ArgumentParser

FORMAT = "dimaskdino-inference-v1"
SUFFIX = ".safetensors"


def is_safetensors(path: str | os.PathLike) -> bool:
    return str(path).endswith(SUFFIX)


def export_safetensors(checkpoint: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Writes the inference weights of `checkpoint` to out_path (atomically); returns the path.
    Refuses weights with non-finite values (they would only predict garbage)."""
    from safetensors.torch import save_file

    from dimaskdino.config import config_to_dict
    from dimaskdino.evaluate import load_checkpoint_for_inference

    out_path = Path(out_path)
    if not is_safetensors(out_path):
        raise ValueError(f"{out_path}: the output file must end in {SUFFIX}")
    model, cfg, category_map = load_checkpoint_for_inference(str(checkpoint), torch.device("cpu"))
    tensors = {name: value.detach().contiguous() for name, value in model.state_dict().items()}
    bad = [name for name, value in tensors.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise ValueError(f"{checkpoint}: non-finite values in {len(bad)} tensors (first: {bad[0]}); not exported")
    metadata = {"format": FORMAT, "config": json.dumps(config_to_dict(cfg)),
                "categories": json.dumps(category_map.state_dict())}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = out_path.with_name(out_path.name + ".tmp")
    save_file(tensors, str(staging), metadata=metadata)
    os.replace(staging, out_path)
    return out_path


def _metadata_field(metadata: dict, key: str, path) -> dict:
    if key not in metadata:
        raise ValueError(f"{path}: safetensors metadata has no {key!r} (not written by dimaskdino.export)")
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: safetensors metadata {key!r} is not valid JSON ({error})") from None


def load_safetensors_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model in eval mode on `device`, config, CategoryMap) from an export: tensors and JSON
    only, no pickle. The weights must match the model the config builds exactly (strict)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from dimaskdino.config import config_from_dict
    from dimaskdino.data.coco import CategoryMap
    from dimaskdino.model import build_model

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except SafetensorError as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: safetensors metadata format is {metadata.get('format')!r}, expected {FORMAT!r}")
    cfg = config_from_dict(_metadata_field(metadata, "config", path), where=f"{path}: config")
    category_map = CategoryMap.from_state_dict(_metadata_field(metadata, "categories", path))
    model = build_model(cfg)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path}: weights do not match the model of its config: {error}") from None
    return model.to(device).eval(), cfg, category_map


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m dimaskdino.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a training checkpoint folder, or a training output folder (its latest)")
    parser.add_argument("output", help=f"the {SUFFIX} file to write")
    args = parser.parse_args(argv)
    path = export_safetensors(args.checkpoint, args.output)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    from dimaskdino.cli import run_cli

    sys.exit(run_cli(main))
