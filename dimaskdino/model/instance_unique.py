"""Instance-unique querying (arXiv 2210.00911), training-only losses.

Two terms help queries pick out one instance rather than a kind of appearance:

- inter-scene mask loss: a queue remembers DETACHED stride-4 pixel embeddings (the model's mask
  features) taken from the GT instances of earlier images of every process. The mask logit of
  every query at such a pixel (mask_embed . entry) is pushed to 0 with a sigmoid focal loss: a
  query may respond to its own instance, never to instances of other scenes. Entries of the
  query's own image are skipped (an image seen again in a later epoch must not push away itself).
- feature equivariance: for a second view g(I) of the image (flip + crop, see
  dimaskdino.data.second_view), the mask features of g(I) should equal g applied to the mask
  features of I (`feature_equivariance_loss`; the masks of g(I) are supervised by the usual
  criterion against g(GT)).

Pixel sampling is instance-balanced (the same number of entries for a large and a tiny instance)
and never stores background. Everything has fixed shapes: no data-dependent host transfer.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dimaskdino.dist import mean_over_processes

from .point_sample import rand_per_image

STRIDE = 4  # the mask features are at 1/4 of the input resolution
QUEUE_CHUNK = 16384  # queue entries per (B, Q, chunk) block of logits in inter_scene_loss


# ---------------------------------------------------------------------------------------------
# Queue
# ---------------------------------------------------------------------------------------------


class PixelEmbeddingQueue:
    """Ring buffer of detached pixel embeddings with the image id each came from.

    features (capacity, dim), valid (capacity,) bool (False until a slot is written, or when it
    was written with an invalid entry) and image_ids (capacity,) int64 live on `device`. The
    write position is a Python int: pushes of a fixed size need no host synchronization.
    """

    def __init__(self, capacity: int, dim: int, device, dtype=torch.float32):
        if capacity < 1:
            raise ValueError(f"PixelEmbeddingQueue: capacity must be positive, got {capacity}")
        if dim < 1:
            raise ValueError(f"PixelEmbeddingQueue: dim must be positive, got {dim}")
        self.capacity, self.dim = int(capacity), int(dim)
        self.features = torch.zeros((self.capacity, self.dim), device=device, dtype=dtype)
        self.valid = torch.zeros((self.capacity,), device=device, dtype=torch.bool)
        self.image_ids = torch.full((self.capacity,), -1, device=device, dtype=torch.int64)
        self.position = 0

    def push(self, entries: torch.Tensor, valid: torch.Tensor, image_ids: torch.Tensor) -> None:
        """Writes n entries after the last ones, wrapping around; with n > capacity only the last
        capacity are kept (as if they had been pushed one by one)."""
        count = entries.shape[0]
        if entries.dim() != 2 or entries.shape[1] != self.dim:
            raise ValueError(f"PixelEmbeddingQueue.push: entries must be (n, {self.dim}), got {tuple(entries.shape)}")
        if valid.shape != (count,):
            raise ValueError(f"PixelEmbeddingQueue.push: valid must be ({count},), got {tuple(valid.shape)}")
        if image_ids.shape != (count,):
            raise ValueError(f"PixelEmbeddingQueue.push: image_ids must be ({count},), got {tuple(image_ids.shape)}")
        if count > self.capacity:
            skipped = count - self.capacity
            entries, valid, image_ids = entries[skipped:], valid[skipped:], image_ids[skipped:]
            self.position = (self.position + skipped) % self.capacity
            count = self.capacity
        if count == 0:
            return
        # Detached: the queue holds constants, never a piece of an old graph.
        new = (
            entries.detach().to(self.features.device, self.features.dtype),
            valid.detach().to(self.valid.device, torch.bool),
            image_ids.detach().to(self.image_ids.device, torch.int64),
        )
        first = min(count, self.capacity - self.position)
        for buffer, values in zip((self.features, self.valid, self.image_ids), new):
            buffer[self.position : self.position + first] = values[:first]
            buffer[: count - first] = values[first:]
        self.position = (self.position + count) % self.capacity

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        return {
            "features": self.features.clone(),
            "valid": self.valid.clone(),
            "image_ids": self.image_ids.clone(),
            "position": self.position,
        }

    def load_state_dict(self, state) -> None:
        """Exact resume: same entries, same next write position. Values are copied onto this
        queue's device and dtype; a shape that does not match this queue is an error."""
        expected = {
            "features": (self.capacity, self.dim),
            "valid": (self.capacity,),
            "image_ids": (self.capacity,),
        }
        for name, shape in expected.items():
            if name not in state:
                raise KeyError(f"PixelEmbeddingQueue.load_state_dict: state has no '{name}'")
            if tuple(state[name].shape) != shape:
                raise ValueError(
                    f"PixelEmbeddingQueue.load_state_dict: '{name}' must be {shape}, got {tuple(state[name].shape)}"
                )
        if "position" not in state:
            raise KeyError("PixelEmbeddingQueue.load_state_dict: state has no 'position'")
        position = int(state["position"])
        if not 0 <= position < self.capacity:
            raise ValueError(f"PixelEmbeddingQueue.load_state_dict: 'position' must be in [0, {self.capacity}), got {position}")
        self.features.copy_(state["features"])
        self.valid.copy_(state["valid"])
        self.image_ids.copy_(state["image_ids"])
        self.position = position


# ---------------------------------------------------------------------------------------------
# Instance-balanced pixel sampling
# ---------------------------------------------------------------------------------------------


def cell_coverage(masks: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """How many pixels of each mask fall in each stride-4 cell: masks (n, H, W) bool ->
    (n, h * w) int64 on a grid_hw = (h, w) feature grid whose cell (i, j) covers pixels
    [4i, 4i + 4) x [4j, 4j + 4). Masks are zero-padded to whole cells; cells beyond the masks get
    0, and the part of a mask beyond the grid (a grid smaller than ceil(H/4) x ceil(W/4)) is
    ignored."""
    count, height, width = masks.shape
    cells_h, cells_w = math.ceil(height / STRIDE), math.ceil(width / STRIDE)
    masks = masks.bool()
    if (cells_h * STRIDE, cells_w * STRIDE) != (height, width):
        padded = masks.new_zeros((count, cells_h * STRIDE, cells_w * STRIDE))
        padded[:, :height, :width] = masks
        masks = padded
    counts = masks.reshape(count, cells_h, STRIDE, cells_w, STRIDE).sum(dim=(2, 4))  # (n, cells_h, cells_w)
    grid_h, grid_w = grid_hw
    counts = counts[:, :grid_h, :grid_w]
    counts = F.pad(counts, (0, grid_w - counts.shape[2], 0, grid_h - counts.shape[1]))
    return counts.reshape(count, grid_h * grid_w)


def draw_cells(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws with replacement: weights (n, L) non-negative integers, uniform (n, P)
    in [0, 1) -> (n, P) cell indices, cell k with probability weights[k] / sum. A zero-weight
    cell is never drawn (unless the whole row is zero: then any index; the caller marks the row
    invalid). Integer arithmetic keeps this exact, and unlike torch.multinomial an all-zero row
    is no error, so nothing has to be checked on the host."""
    cdf = weights.cumsum(dim=1)
    total = cdf[:, -1:]
    # target in [1, total]: the first k with cdf[k] >= target has weights[k] > 0.
    target = (uniform * total.to(uniform.dtype)).floor().long() + 1
    target = torch.minimum(target, total.clamp(min=1))
    index = torch.searchsorted(cdf, target)
    return index.clamp(max=weights.shape[1] - 1)


def sample_instance_pixels(
    mask_features: torch.Tensor,
    gt_masks: list[torch.Tensor],
    pixels_per_instance: int,
    max_instances: int,
    generators: list[torch.Generator] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Instance-balanced sample of mask-feature pixels of the GT instances.

    mask_features (B, d, h, w): the stride-4 features of the (padded) canvas; cell (i, j) covers
    input pixels [4i, 4i + 4) x [4j, 4j + 4). gt_masks[b] (N_b, H, W) bool at the input
    resolution (h may exceed ceil(H / 4): the padded canvas' cells get no coverage).
    For each image b and each of its first max_instances masks, pixels_per_instance cells are
    drawn with replacement, with probability proportional to the instance's pixel count in the
    cell (area-average pooling, so a one-pixel instance still has a cell). Random numbers of
    image b come from generators[b] (None: the global generator), max_instances x
    pixels_per_instance of them whatever N_b, so an image's draws do not depend on its batch.

    Returns entries (B * max_instances * pixels_per_instance, d) DETACHED, in the order
    (image, instance slot, draw), and valid (same first dim,) bool: False for the slots beyond
    N_b and for instances with no pixel on the grid. Fixed shapes: no host synchronization.
    """
    if mask_features.dim() != 4:
        raise ValueError(f"sample_instance_pixels: mask_features must be (B, d, h, w), got {tuple(mask_features.shape)}")
    batch, dim, grid_h, grid_w = mask_features.shape
    if len(gt_masks) != batch:
        raise ValueError(f"sample_instance_pixels: gt_masks has {len(gt_masks)} images, mask_features {batch}")
    if pixels_per_instance < 1:
        raise ValueError(f"sample_instance_pixels: pixels_per_instance must be positive, got {pixels_per_instance}")
    if max_instances < 1:
        raise ValueError(f"sample_instance_pixels: max_instances must be positive, got {max_instances}")
    device = mask_features.device
    uniform = rand_per_image([max_instances] * batch, (pixels_per_instance,), device, generators)
    uniform = uniform.view(batch, max_instances, pixels_per_instance)

    features = mask_features.detach().flatten(2).transpose(1, 2)  # (B, h * w, d)
    entries, valid = [], []
    for b, masks in enumerate(gt_masks):
        if masks.dim() != 3:
            raise ValueError(f"sample_instance_pixels: gt_masks[{b}] must be (N, H, W), got {tuple(masks.shape)}")
        masks = masks[:max_instances].to(device)
        used = masks.shape[0]
        weights = cell_coverage(masks, (grid_h, grid_w))  # (used, h * w)
        cells = torch.zeros((max_instances, pixels_per_instance), dtype=torch.int64, device=device)
        cells[:used] = draw_cells(weights, uniform[b, :used])
        slot_valid = torch.zeros((max_instances,), dtype=torch.bool, device=device)
        slot_valid[:used] = weights.sum(dim=1) > 0
        entries.append(features[b][cells.view(-1)])
        valid.append(slot_valid[:, None].expand(max_instances, pixels_per_instance).reshape(-1))
    return torch.cat(entries), torch.cat(valid)


def entry_image_ids(image_ids: torch.Tensor, max_instances: int, pixels_per_instance: int) -> torch.Tensor:
    """The image id of every entry of `sample_instance_pixels`: image_ids (B,) ->
    (B * max_instances * pixels_per_instance,), in the same order."""
    return image_ids.to(torch.int64).repeat_interleave(max_instances * pixels_per_instance)


def gather_from_all_processes(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """all_gather along dim 0 (rank order) when torch.distributed is initialized, identity
    otherwise. Every rank must pass the same shapes (sample_instance_pixels' are fixed). No
    gradient flows through (the queue holds detached entries). Bool tensors travel as uint8,
    which every backend supports."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return tuple(tensors)
    world = dist.get_world_size()
    gathered = []
    for tensor in tensors:
        is_bool = tensor.dtype == torch.bool
        local = tensor.detach().to(torch.uint8) if is_bool else tensor.detach()
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local)
        joined = torch.cat(parts)
        gathered.append(joined.bool() if is_bool else joined)
    return tuple(gathered)


# ---------------------------------------------------------------------------------------------
# Inter-scene loss
# ---------------------------------------------------------------------------------------------


def _focal_to_zero(logits: torch.Tensor, alpha: float, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid focal loss with target 0, elementwise, and its derivative in the logit:
    loss = (1 - alpha) p^gamma softplus(x), dloss/dx = (1 - alpha) p^gamma (gamma (1 - p) softplus(x) + p)."""
    prob = torch.sigmoid(logits)
    softplus = F.softplus(logits)  # = BCE with target 0, stable for large logits
    scaled = (1.0 - alpha) * prob.pow(gamma)
    return scaled * softplus, scaled * (gamma * (1.0 - prob) * softplus + prob)


class _InterSceneFocal(torch.autograd.Function):
    """Mean focal loss over the counted (query, entry) pairs, a chunk of the queue at a time.

    The gradient in mask_embed is accumulated chunk by chunk during the forward, so only
    (B, Q, d) is kept for the backward and the (B, Q, chunk) logits of one chunk are freed before
    the next: memory does not grow with the queue (plain autograd would keep every chunk's
    logits until the backward)."""

    @staticmethod
    def forward(ctx, mask_embed, features, entry_valid, entry_ids, image_ids, alpha, gamma, chunk_size):
        with torch.autocast(device_type=mask_embed.device.type, enabled=False):
            embed = mask_embed.float()
            needs_grad = ctx.needs_input_grad[0]
            total = embed.new_zeros(())
            pairs = embed.new_zeros(())
            grad = torch.zeros_like(embed) if needs_grad else None
            for start in range(0, features.shape[0], chunk_size):
                stop = start + chunk_size
                chunk = features[start:stop].to(embed)  # (c, d)
                counted = entry_valid[start:stop][None, :] & (entry_ids[start:stop][None, :] != image_ids[:, None])
                weight = counted.to(embed.dtype)[:, None, :]  # (B, 1, c)
                loss, slope = _focal_to_zero(torch.matmul(embed, chunk.t()), alpha, gamma)  # (B, Q, c)
                total = total + (loss * weight).sum()
                pairs = pairs + weight.sum() * embed.shape[1]
                if needs_grad:
                    grad = grad + torch.matmul(slope * weight, chunk)
            # Mean over every process's pairs (so 2 processes give 1 process's loss); no pair
            # counts anywhere: total is 0, so the loss is 0.
            denominator = mean_over_processes(pairs, pairs.device, minimum=1.0)
            if needs_grad:
                ctx.save_for_backward(grad / denominator)
            ctx.embed_dtype = mask_embed.dtype
            return total / denominator

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output).to(ctx.embed_dtype), None, None, None, None, None, None, None


def inter_scene_loss(
    mask_embed: torch.Tensor,
    queue: PixelEmbeddingQueue,
    image_ids: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    chunk_size: int = QUEUE_CHUNK,
) -> torch.Tensor:
    """Pushes every query's mask logit on other scenes' instance pixels towards 0.

    mask_embed (B, Q, d) of the current images, image_ids (B,) their ids. The loss is the sigmoid
    focal loss (target 0) of the logit mask_embed[b, q] . queue.features[k] for every query and
    every VALID entry k with queue.image_ids[k] != image_ids[b], averaged over those (query,
    entry) pairs; a 0 that is still in the graph (gradient zero) when no pair counts. Computed in
    float32, chunk_size entries at a time; the gradient flows into mask_embed only.
    """
    if mask_embed.dim() != 3:
        raise ValueError(f"inter_scene_loss: mask_embed must be (B, Q, d), got {tuple(mask_embed.shape)}")
    if mask_embed.shape[2] != queue.dim:
        raise ValueError(f"inter_scene_loss: mask_embed has d = {mask_embed.shape[2]}, the queue {queue.dim}")
    if image_ids.shape != (mask_embed.shape[0],):
        raise ValueError(f"inter_scene_loss: image_ids must be ({mask_embed.shape[0]},), got {tuple(image_ids.shape)}")
    if chunk_size < 1:
        raise ValueError(f"inter_scene_loss: chunk_size must be positive, got {chunk_size}")
    device = mask_embed.device
    return _InterSceneFocal.apply(
        mask_embed,
        queue.features.detach().to(device),
        queue.valid.to(device),
        queue.image_ids.to(device),
        image_ids.to(device, torch.int64),
        float(alpha),
        float(gamma),
        int(chunk_size),
    )


# ---------------------------------------------------------------------------------------------
# Equivariance of the mask features
# ---------------------------------------------------------------------------------------------


def feature_equivariance_loss(
    features_second: torch.Tensor, features_first: torch.Tensor, grid: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Mean over valid cells of 1 - cos(features_second[b, :, i, j], g(features_first)[b, :, i, j]).

    features_second (B, d, h, w): mask features of the second view; features_first (B, d, h', w'):
    those of the first view, resampled at grid (B, h, w, 2) (normalized (x, y), grid_sample
    bilinear, align_corners=False: second_view.view_grid at the feature size); valid (B, h, w)
    bool (second_view.view_valid_cells). Float32; both sides get gradients; 0 in the graph when
    no cell is valid.
    """
    if features_second.dim() != 4 or features_first.dim() != 4:
        raise ValueError(
            f"feature_equivariance_loss: features_second and features_first must be (B, d, h, w), got "
            f"{tuple(features_second.shape)} and {tuple(features_first.shape)}"
        )
    batch, dim, height, width = features_second.shape
    if features_first.shape[:2] != (batch, dim):
        raise ValueError(
            f"feature_equivariance_loss: features_first must be ({batch}, {dim}, ...), got {tuple(features_first.shape)}"
        )
    if grid.shape != (batch, height, width, 2):
        raise ValueError(f"feature_equivariance_loss: grid must be {(batch, height, width, 2)}, got {tuple(grid.shape)}")
    if valid.shape != (batch, height, width):
        raise ValueError(f"feature_equivariance_loss: valid must be {(batch, height, width)}, got {tuple(valid.shape)}")
    with torch.autocast(device_type=features_second.device.type, enabled=False):
        target = F.grid_sample(
            features_first.float(), grid.float(), mode="bilinear", padding_mode="zeros", align_corners=False
        )
        cosine = F.cosine_similarity(features_second.float(), target, dim=1, eps=1e-6)  # (B, h, w)
        weight = valid.to(cosine.dtype)
        # Mean over every process's valid cells (N processes give the 1-process loss).
        return ((1.0 - cosine) * weight).sum() / mean_over_processes(weight.sum(), weight.device, minimum=1.0)
