"""Instance-unique querying (SPEC section 6, arXiv 2210.00911) as used by a training step.

The pieces are in dimaskdino.model.instance_unique (queue, sampling, losses) and
dimaskdino.data.second_view (the second view g(I)); this module holds the per-run state (the queue)
and combines them with the criterion. Co-DETR's hybrid assignment needs nothing here: the model
returns its outputs under "hybrid" and the criterion turns them into losses.

Loss keys: "inter_scene/focal"; "equi/<output>/<term>" (the usual terms of the second view against
g(GT)) and "equi/features" (mask features of g(I) against g(mask features of I)).
"""

from __future__ import annotations

import torch

from dimaskdino.data.second_view import view_grids
from dimaskdino.model.instance_unique import (
    PixelEmbeddingQueue,
    entry_image_ids,
    feature_equivariance_loss,
    gather_from_all_processes,
    inter_scene_loss,
    sample_instance_pixels,
)


class InterSceneTerm:
    """Every query's mask logits on pixels of other images' instances pushed to 0 (focal loss).

    The loss of a step uses the queue as it was before the step; the step's own pixels (from every
    process) are pushed afterwards, so a query never sees its own image in the same step, and the
    queue's image ids exclude the image's entries from earlier epochs too."""

    def __init__(self, capacity: int, dim: int, pixels_per_instance: int, max_instances: int, weight: float,
                 focal_alpha: float, focal_gamma: float, device: torch.device):
        self.queue = PixelEmbeddingQueue(capacity, dim, device)
        self.pixels_per_instance = pixels_per_instance
        self.max_instances = max_instances
        self.weight = weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @classmethod
    def from_config(cls, cfg, device: torch.device) -> "InterSceneTerm":
        train = cfg.train
        return cls(train.inter_scene_queue_size, cfg.model.hidden_dim, train.inter_scene_pixels_per_instance,
                   train.inter_scene_max_instances, train.inter_scene_weight, cfg.loss.focal_alpha, cfg.loss.focal_gamma,
                   device)

    def __call__(self, prediction: dict, targets: list[dict], generators: list[torch.Generator] | None) -> dict[str, torch.Tensor]:
        """prediction: the final decoder output, with "mask_embed" (B, Q, d) and "mask_features"."""
        if "mask_embed" not in prediction or "mask_features" not in prediction:
            raise ValueError("inter-scene loss: the final output has no 'mask_embed'/'mask_features' "
                             "(build the model with train.inter_scene=true)")
        device = prediction["mask_embed"].device
        image_ids = torch.tensor([int(t["image_id"]) for t in targets], dtype=torch.int64, device=device)
        loss = inter_scene_loss(prediction["mask_embed"], self.queue, image_ids, self.focal_alpha, self.focal_gamma)
        with torch.no_grad():
            entries, valid = sample_instance_pixels(
                prediction["mask_features"], [t["masks"] for t in targets], self.pixels_per_instance,
                self.max_instances, generators,
            )
            entry_ids = entry_image_ids(image_ids, self.max_instances, self.pixels_per_instance)
            self.queue.push(*gather_from_all_processes(entries, valid, entry_ids))
        return {"inter_scene/focal": self.weight * loss}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (saved with torch.distributed.checkpoint)."""
        return {key: value if isinstance(value, torch.Tensor) else torch.tensor(value)
                for key, value in self.queue.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        current = self.queue.state_dict()
        self.queue.load_state_dict({
            key: value if isinstance(current.get(key), torch.Tensor) else type(current[key])(value.item())
            for key, value in state.items()
        })


def equivariance_losses(criterion, first: dict, second: dict, second_view: dict, final_key: str, weight: float,
                        generators: list[torch.Generator] | None) -> dict[str, torch.Tensor]:
    """The second view's usual losses against g(GT) ("equi/..."), and 1 - cosine between its final
    mask features and the first view's mask features mapped by g ("equi/features", x weight).

    first, second: the model's outputs on the two views; second_view: the batch's "second_view"
    entry (images, targets, transforms)."""
    matches = criterion.last_matches, criterion.final_output_name  # the first view's, kept for logging
    losses = {f"equi/{key}": value for key, value in criterion(second, second_view["targets"], generators).items()}
    criterion.last_matches, criterion.final_output_name = matches

    features_first = first[final_key]["mask_features"]
    features_second = second[final_key]["mask_features"]
    grid, valid = view_grids(second_view["transforms"], tuple(second_view["images"].shape[-2:]),
                             tuple(features_second.shape[-2:]), features_second.device)
    feature_loss = feature_equivariance_loss(features_second, features_first, grid, valid)  # in float32
    losses["equi/features"] = weight * feature_loss
    return losses
