"""Do the parity tests bite? Reverts each of issue 11's points 1-4 in turn (in memory, by
replacing the function that implements it with the engine's former code), reruns the comparison
of tests/test_parity.py against the authors' fixtures, and records the largest difference per
output kind and whether the test's assertion fails. The first row is the engine as it is.

    python benchmarks/parity_reverts.py [--out DIR]    # default outputs/benchmarks
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import test_parity as parity  # noqa: E402
from provenance import write_result  # noqa: E402

import dimaskdino.model.dimaskdino as assembly  # noqa: E402
from dimaskdino.model import di, heads  # noqa: E402
from dimaskdino.model.box_ops import box_xyxy_to_cxcywh, masks_to_boxes  # noqa: E402
from dimaskdino.model.layers import box_sine_embedding, refine_boxes  # noqa: E402
from dimaskdino.model.query_selection import gather_tokens  # noqa: E402


@contextlib.contextmanager
def replaced(owner, name: str, value):
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def single_norm_predict():
    """Point 1 reverted: decoder layers' class and mask heads see decoder_norm once."""
    original = heads.PredictionHeads.predict

    def predict(self, *args, renorm=False, **kwargs):
        return original(self, *args, **kwargs)

    return replaced(heads.PredictionHeads, "predict", predict)


def fine_first_proposals():
    """Point 2 reverted: proposal sizes 0.05 * 2^i with i = 0 at stride 8 (0.4 at stride 64)."""

    def encoder_proposals(shapes, device, sizes="authors"):  # the option is ignored: this is the revert
        proposals = []
        for level, (height, width) in enumerate(shapes):
            ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
            xs = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
            size = torch.full_like(grid_x, 0.05 * 2.0**level)
            proposals.append(torch.stack((grid_x, grid_y, size, size), dim=-1).reshape(-1, 4))
        proposals = torch.cat(proposals)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(dim=-1)
        return torch.log(proposals / (1 - proposals)).masked_fill(~valid[:, None], float("inf")), valid

    return replaced(assembly, "encoder_proposals", encoder_proposals)


def plain_ti_outputs():
    """Point 3 reverted: TI-loss logits = class_head(ti_norm(x)) (no decoder_norm) and boxes = the
    box passed on (no second delta)."""

    def forward(self, content, boxes, heads_, num_select):
        layer_outputs, refined = [], boxes
        for layer in self.layers:
            position = self.ref_point_head(box_sine_embedding(boxes, self.hidden_dim // 2))
            content = layer(content, position)
            refined = refine_boxes(self.bbox_embed, content, boxes)
            boxes = refined.detach()
            layer_outputs.append({"logits": heads_.class_embed(self.norm(content)), "boxes": refined})
        scores = layer_outputs[-1]["logits"].max(dim=-1).values
        index = scores.topk(min(num_select, scores.shape[1]), dim=1).indices
        return di.TokenInteractionOutput(gather_tokens(content, index), gather_tokens(refined, index), layer_outputs)

    return replaced(di.TokenInteraction, "forward", forward)


def pixel_edge_mask_boxes():
    """Point 4 reverted: mask-to-box with +1 on the max index (pixel edges), an empty mask a
    zero box, no clamp through the authors' inverse sigmoid."""

    def mask_enhanced_boxes(mask_logits, selected_boxes=None):  # selected_boxes ignored: the revert
        height, width = mask_logits.shape[-2:]
        xyxy = masks_to_boxes(mask_logits > 0)
        return box_xyxy_to_cxcywh(xyxy / xyxy.new_tensor([width, height, width, height]))

    return replaced(assembly, "mask_enhanced_boxes", mask_enhanced_boxes)


REVERTS = {
    "none": contextlib.nullcontext,
    "1_decoder_norm_once": single_norm_predict,
    "2_proposal_sizes_fine_first": fine_first_proposals,
    "3_ti_outputs_plain": plain_ti_outputs,
    "4_mask_boxes_plus_one": pixel_edge_mask_boxes,
}


def measure(kind: str) -> dict:
    parity.engine_eval.cache_clear()
    pairs = parity.output_pairs(kind, parity.eval_reference(kind))
    worst: dict[str, float] = {}
    for name, field, ours, theirs, _ in pairs:
        diff = (ours.float() - theirs.float()).abs().max().item()
        worst[field] = max(worst.get(field, 0.0), diff)
        worst[f"{name}/{field}"] = diff
    try:
        parity.assert_outputs_match(kind, parity.eval_reference(kind))
        failure = None
    except AssertionError as error:
        failure = str(error)
    return {"max_abs_diff": worst, "test_fails": failure is not None, "failure": failure}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # A plain run never replaces the committed result: benchmarks/results/ is written on purpose.
    parser.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks"), help="result folder")
    args = parser.parse_args()
    rows = {}
    for revert, patch in REVERTS.items():
        for kind in parity.KINDS:
            if revert.startswith("3_") and kind == "maskdino":
                continue  # MaskDINO has no TI layers
            with patch():
                rows[f"{revert}/{kind}"] = row = measure(kind)
            summary = ", ".join(f"{f} {row['max_abs_diff'].get(f, float('nan')):.3g}" for f in ("logits", "boxes", "masks"))
            print(f"{revert:30s} {kind:11s} test {'FAILS' if row['test_fails'] else 'passes'}; max abs diff: {summary}")
    payload = {"tolerances": {"logits": parity.LOGIT_TOL, "boxes": parity.BOX_TOL, "masks": parity.MASK_TOL},
               "reverts": {name: (fn.__doc__ or "the engine as it is").strip() for name, fn in REVERTS.items()},
               "rows": rows}
    print(write_result(args.out, "cpu-parity-reverts.json", payload))


if __name__ == "__main__":
    main()
