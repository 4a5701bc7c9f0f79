"""Instance-unique querying: the pixel queue, instance-balanced sampling, the inter-scene loss
(against a brute-force loop) and the feature equivariance loss."""

import pytest
import torch
import torch.distributed as dist

from conftest import record_host_syncs
from dimaskdino.data.second_view import ViewTransform, view_grid, view_valid_cells
from dimaskdino.model.criterion import sigmoid_focal_loss_sum
from dimaskdino.model.instance_unique import (
    PixelEmbeddingQueue,
    entry_image_ids,
    feature_equivariance_loss,
    gather_from_all_processes,
    inter_scene_loss,
    sample_instance_pixels,
)


def generators(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def numbered(count, dim=2, start=0):
    """Entries whose every coordinate is their number: easy to follow through the ring."""
    return torch.arange(start, start + count, dtype=torch.float32)[:, None].expand(count, dim).clone()


# ---------------------------------------------------------------------------------------------
# Queue
# ---------------------------------------------------------------------------------------------


def test_queue_starts_empty_and_wraps_around():
    queue = PixelEmbeddingQueue(capacity=5, dim=2, device="cpu")
    assert not queue.valid.any()

    queue.push(numbered(3), torch.tensor([True, False, True]), torch.tensor([10, 11, 12]))
    assert queue.position == 3
    assert queue.features[:3, 0].tolist() == [0, 1, 2]
    assert queue.valid.tolist() == [True, False, True, False, False]
    assert queue.image_ids[:3].tolist() == [10, 11, 12]

    queue.push(numbered(4, start=3), torch.ones(4, dtype=torch.bool), torch.tensor([13, 14, 15, 16]))
    assert queue.position == 2
    assert queue.features[:, 0].tolist() == [5, 6, 2, 3, 4]  # 5 and 6 overwrote the oldest
    assert queue.valid.tolist() == [True, True, True, True, True]
    assert queue.image_ids.tolist() == [15, 16, 12, 13, 14]


def test_queue_push_larger_than_capacity_keeps_the_last_entries():
    many = PixelEmbeddingQueue(capacity=4, dim=2, device="cpu")
    one_by_one = PixelEmbeddingQueue(capacity=4, dim=2, device="cpu")
    many.push(numbered(1), torch.ones(1, dtype=torch.bool), torch.zeros(1, dtype=torch.int64))
    one_by_one.push(numbered(1), torch.ones(1, dtype=torch.bool), torch.zeros(1, dtype=torch.int64))

    entries, valid, ids = numbered(7, start=1), torch.arange(7) % 3 > 0, torch.arange(1, 8)
    many.push(entries, valid, ids)
    for k in range(7):
        one_by_one.push(entries[k : k + 1], valid[k : k + 1], ids[k : k + 1])
    assert many.position == one_by_one.position == 0
    assert torch.equal(many.features, one_by_one.features)
    assert torch.equal(many.valid, one_by_one.valid)
    assert torch.equal(many.image_ids, one_by_one.image_ids)
    assert sorted(many.features[:, 0].tolist()) == [4, 5, 6, 7]


def test_queue_stores_detached_entries():
    queue = PixelEmbeddingQueue(capacity=4, dim=3, device="cpu")
    source = torch.randn(2, 3, requires_grad=True)
    queue.push(source * 2, torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.int64))
    assert not queue.features.requires_grad
    assert torch.equal(queue.features[:2], (source * 2).detach())


def test_queue_push_checks_shapes():
    queue = PixelEmbeddingQueue(capacity=4, dim=3, device="cpu")
    with pytest.raises(ValueError, match="entries"):
        queue.push(torch.zeros(2, 2), torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="valid"):
        queue.push(torch.zeros(2, 3), torch.ones(3, dtype=torch.bool), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="image_ids"):
        queue.push(torch.zeros(2, 3), torch.ones(2, dtype=torch.bool), torch.zeros(1, dtype=torch.int64))


def test_queue_state_dict_round_trip_resumes_exactly():
    queue = PixelEmbeddingQueue(capacity=6, dim=3, device="cpu")
    queue.push(torch.randn(4, 3), torch.tensor([True, True, False, True]), torch.tensor([1, 2, 3, 4]))
    state = queue.state_dict()

    resumed = PixelEmbeddingQueue(capacity=6, dim=3, device="cpu")
    resumed.load_state_dict(state)
    entries, valid, ids = torch.randn(5, 3), torch.ones(5, dtype=torch.bool), torch.arange(5)
    queue.push(entries, valid, ids)
    resumed.push(entries, valid, ids)
    assert resumed.position == queue.position
    for name in ("features", "valid", "image_ids"):
        assert torch.equal(getattr(resumed, name), getattr(queue, name))


def test_queue_state_dict_is_a_copy():
    queue = PixelEmbeddingQueue(capacity=3, dim=2, device="cpu")
    state = queue.state_dict()
    queue.push(torch.ones(3, 2), torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.int64))
    assert not state["valid"].any() and state["position"] == 0


def test_queue_load_state_dict_names_the_mismatched_field():
    state = PixelEmbeddingQueue(capacity=6, dim=3, device="cpu").state_dict()
    with pytest.raises(ValueError, match="'features'"):
        PixelEmbeddingQueue(capacity=6, dim=4, device="cpu").load_state_dict(state)
    with pytest.raises(ValueError, match="'features'"):
        PixelEmbeddingQueue(capacity=5, dim=3, device="cpu").load_state_dict(state)
    with pytest.raises(ValueError, match="'image_ids'"):
        PixelEmbeddingQueue(capacity=6, dim=3, device="cpu").load_state_dict({**state, "image_ids": torch.zeros(2)})
    with pytest.raises(KeyError, match="'valid'"):
        PixelEmbeddingQueue(capacity=6, dim=3, device="cpu").load_state_dict(
            {k: v for k, v in state.items() if k != "valid"}
        )
    with pytest.raises(ValueError, match="'position'"):
        PixelEmbeddingQueue(capacity=6, dim=3, device="cpu").load_state_dict({**state, "position": 6})


# ---------------------------------------------------------------------------------------------
# Instance-balanced sampling
# ---------------------------------------------------------------------------------------------


def cell_index_features(batch, height, width):
    """Mask features whose two channels are the cell's row and column."""
    rows = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width)
    cols = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width)
    return torch.stack((rows, cols))[None].expand(batch, 2, height, width).clone()


def box_mask(size, y0, y1, x0, x1):
    mask = torch.zeros(size, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def entry_cells(entries):
    return entries[:, 0].long(), entries[:, 1].long()


def test_entries_come_only_from_cells_the_instance_covers():
    # Canvas 30 x 30 (not a multiple of 4: ceil = 8 cells) and features of a padded 40 x 40 canvas.
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(3, 30, 30, generator=g) > 0.97  # scattered pixels
    masks[2] = False
    masks[2, 28:30, 5:9] = True  # in the partial last row of cells
    features = cell_index_features(1, 10, 10)
    per_instance = 40
    entries, valid = sample_instance_pixels(features, [masks], per_instance, 3, generators(0))
    assert entries.shape == (3 * per_instance, 2) and valid.all()
    rows, cols = entry_cells(entries)
    instance = torch.arange(3).repeat_interleave(per_instance)
    for k in range(len(entries)):
        cell = masks[instance[k], 4 * rows[k] : 4 * rows[k] + 4, 4 * cols[k] : 4 * cols[k] + 4]
        assert cell.any(), f"entry {k} of instance {instance[k]} is from an uncovered cell"
    assert set(rows[2 * per_instance :].tolist()) == {7}


def test_a_one_pixel_instance_still_gets_entries():
    masks = torch.zeros(1, 32, 32, dtype=torch.bool)
    masks[0, 13, 22] = True
    entries, valid = sample_instance_pixels(cell_index_features(1, 8, 8), [masks], 5, 1, generators(0))
    assert valid.all()
    rows, cols = entry_cells(entries)
    assert rows.tolist() == [3] * 5 and cols.tolist() == [5] * 5


def test_padding_slots_and_empty_instances_are_invalid():
    one = box_mask((16, 16), 0, 8, 0, 8)[None]
    with_empty = torch.stack((box_mask((16, 16), 4, 12, 4, 12), torch.zeros(16, 16, dtype=torch.bool)))
    none = torch.zeros(0, 16, 16, dtype=torch.bool)
    entries, valid = sample_instance_pixels(cell_index_features(3, 4, 4), [one, with_empty, none], 2, 3, generators(0, 1, 2))
    assert entries.shape == (3 * 3 * 2, 2)
    per_slot = valid.view(3, 3, 2)
    assert (per_slot.all(-1) == per_slot.any(-1)).all()  # a slot is valid or not as a whole
    assert per_slot[:, :, 0].tolist() == [[True, False, False], [True, False, False], [False, False, False]]


def test_only_the_first_max_instances_are_sampled():
    masks = torch.stack([box_mask((16, 16), 4 * k, 4 * k + 4, 0, 4) for k in range(4)])
    entries, valid = sample_instance_pixels(cell_index_features(1, 4, 4), [masks], 3, 2, generators(0))
    assert valid.all()
    rows, _ = entry_cells(entries)
    assert rows.tolist() == [0, 0, 0, 1, 1, 1]


def test_instances_of_very_different_area_get_the_same_count():
    large = box_mask((64, 64), 0, 40, 0, 60)  # 2400 pixels
    small = box_mask((64, 64), 41, 43, 50, 51)  # 2 pixels
    masks = torch.stack((large, small))
    entries, valid = sample_instance_pixels(cell_index_features(1, 16, 16), [masks], 50, 2, generators(3))
    per_instance = valid.view(2, 50).sum(dim=1)
    assert per_instance.tolist() == [50, 50]
    rows, cols = entry_cells(entries[50:])
    assert set(zip(rows.tolist(), cols.tolist())) == {(10, 12)}


def test_cells_are_drawn_in_proportion_to_coverage():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 0:4, 0:4] = True  # cell (0, 0): 16 pixels
    mask[0, 4, 4:8] = True  # cell (1, 1): 4 pixels
    entries, _ = sample_instance_pixels(cell_index_features(1, 2, 2), [mask], 4000, 1, generators(5))
    rows, _ = entry_cells(entries)
    share = (rows == 0).float().mean().item()
    assert abs(share - 0.8) < 0.03
    assert set(rows.tolist()) == {0, 1}


def test_sampling_is_deterministic_per_image_and_detached():
    g = torch.Generator().manual_seed(0)
    masks = [torch.rand(2, 16, 16, generator=g) > 0.5, torch.rand(3, 16, 16, generator=g) > 0.7]
    features = torch.randn(2, 4, 4, 4, requires_grad=True)
    first, valid = sample_instance_pixels(features, masks, 6, 3, generators(7, 8))
    again, _ = sample_instance_pixels(features, masks, 6, 3, generators(7, 8))
    alone, _ = sample_instance_pixels(features[1:], masks[1:], 6, 3, generators(8))
    assert not first.requires_grad
    assert torch.equal(first, again)
    assert torch.equal(first[18:], alone)  # an image's draws do not depend on its batch
    other, _ = sample_instance_pixels(features, masks, 6, 3, generators(9, 8))
    assert not torch.equal(first[:18], other[:18])


def test_a_training_step_of_the_queue_needs_no_host_synchronization(monkeypatch):
    masks = [torch.rand(2, 30, 30) > 0.8, torch.zeros(0, 30, 30, dtype=torch.bool)]
    features = torch.randn(2, 4, 8, 8)
    embed = torch.randn(2, 5, 4, requires_grad=True)
    queue = PixelEmbeddingQueue(50, 4, device="cpu")
    image_ids = torch.tensor([3, 4])
    calls = record_host_syncs(monkeypatch)
    entries, valid = sample_instance_pixels(features, masks, 6, 3, generators(1, 2))
    queue.push(entries, valid, entry_image_ids(image_ids, 3, 6))
    loss = inter_scene_loss(embed, queue, image_ids, chunk_size=16)
    loss.backward()
    assert calls == []


def test_sampling_checks_its_arguments():
    features = torch.zeros(1, 2, 4, 4)
    masks = [torch.zeros(1, 16, 16, dtype=torch.bool)]
    with pytest.raises(ValueError, match="gt_masks"):
        sample_instance_pixels(features, masks * 2, 2, 1, None)
    with pytest.raises(ValueError, match="pixels_per_instance"):
        sample_instance_pixels(features, masks, 0, 1, None)
    with pytest.raises(ValueError, match="max_instances"):
        sample_instance_pixels(features, masks, 2, 0, None)


def test_entry_image_ids_follow_the_entry_order():
    ids = entry_image_ids(torch.tensor([5, 9]), max_instances=2, pixels_per_instance=3)
    assert ids.tolist() == [5] * 6 + [9] * 6


def test_gather_is_identity_without_a_process_group():
    a, b = torch.randn(3, 2), torch.tensor([True, False, True])
    out = gather_from_all_processes(a, b)
    assert out[0] is a and out[1] is b


def test_gather_in_a_group_of_one_keeps_values_and_dtypes():
    assert not dist.is_initialized()
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        a, b = torch.randn(3, 2), torch.tensor([True, False, True])
        ga, gb = gather_from_all_processes(a, b)
        assert torch.equal(ga, a) and torch.equal(gb, b) and gb.dtype == torch.bool
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Inter-scene loss
# ---------------------------------------------------------------------------------------------


def filled_queue(capacity, dim, entries, valid, ids):
    queue = PixelEmbeddingQueue(capacity, dim, device="cpu")
    queue.push(entries, valid, ids)
    return queue


def brute_force_loss(mask_embed, queue, image_ids, alpha, gamma):
    terms = []
    for b in range(mask_embed.shape[0]):
        for q in range(mask_embed.shape[1]):
            for k in range(queue.capacity):
                if queue.valid[k] and queue.image_ids[k] != image_ids[b]:
                    logit = (mask_embed[b, q] * queue.features[k]).sum()
                    terms.append(sigmoid_focal_loss_sum(logit, torch.zeros(()), alpha, gamma))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("chunk_size", [3, 1000])
def test_inter_scene_loss_matches_a_brute_force_loop(chunk_size):
    torch.manual_seed(1)
    dim = 4
    ids = torch.tensor([1, 2, 1, 3, 2, 4, 5, 1, 2, 3])
    valid = torch.tensor([True, True, False, True, True, True, False, True, True, True])
    queue = filled_queue(12, dim, torch.randn(10, dim) * 2, valid, ids)  # 2 slots never written
    image_ids = torch.tensor([1, 2])
    embed = torch.randn(2, 3, dim, requires_grad=True)
    reference = embed.detach().clone().requires_grad_()

    loss = inter_scene_loss(embed, queue, image_ids, alpha=0.3, gamma=1.5, chunk_size=chunk_size)
    expected = brute_force_loss(reference, queue, image_ids, 0.3, 1.5)
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-7)

    loss.backward()
    expected.backward()
    assert torch.allclose(embed.grad, reference.grad, rtol=1e-4, atol=1e-7)
    assert not queue.features.requires_grad and queue.features.grad is None


def test_inter_scene_loss_excludes_own_image_entries():
    dim = 3
    queue = filled_queue(4, dim, torch.randn(4, dim), torch.ones(4, dtype=torch.bool), torch.tensor([7, 7, 8, 8]))
    embed = torch.randn(1, 2, dim, requires_grad=True)
    loss = inter_scene_loss(embed, queue, torch.tensor([7]))
    # Only entries 2 and 3 (image 8) count for image 7.
    only_other = filled_queue(2, dim, queue.features[2:], torch.ones(2, dtype=torch.bool), torch.tensor([8, 8]))
    assert torch.allclose(loss, inter_scene_loss(embed, only_other, torch.tensor([7])))


def test_inter_scene_loss_is_a_finite_zero_in_the_graph_without_counted_entries():
    dim = 3
    embed = torch.randn(2, 4, dim, requires_grad=True)
    empty = PixelEmbeddingQueue(8, dim, device="cpu")
    own = filled_queue(2, dim, torch.randn(2, dim), torch.ones(2, dtype=torch.bool), torch.tensor([1, 1]))
    for queue in (empty, own):  # both images are image 1 (e.g. a repeat at the end of an epoch)
        loss = inter_scene_loss(embed, queue, torch.tensor([1, 1]))
        assert torch.isfinite(loss) and loss.item() == 0.0
        assert loss.requires_grad
        (grad,) = torch.autograd.grad(loss, embed)
        assert torch.equal(grad, torch.zeros_like(embed))


def test_inter_scene_loss_runs_in_float32_for_low_precision_embeddings():
    dim = 4
    queue = filled_queue(6, dim, torch.randn(6, dim), torch.ones(6, dtype=torch.bool), torch.arange(6))
    embed = torch.randn(2, 3, dim).to(torch.bfloat16).requires_grad_()
    loss = inter_scene_loss(embed, queue, torch.tensor([0, 1]))
    expected = inter_scene_loss(embed.detach().float(), queue, torch.tensor([0, 1]))
    assert loss.dtype == torch.float32 and torch.allclose(loss, expected)
    loss.backward()
    assert embed.grad.dtype == torch.bfloat16


def test_inter_scene_loss_checks_shapes():
    queue = PixelEmbeddingQueue(4, 3, device="cpu")
    with pytest.raises(ValueError, match="mask_embed"):
        inter_scene_loss(torch.zeros(2, 3, 5), queue, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="image_ids"):
        inter_scene_loss(torch.zeros(2, 3, 3), queue, torch.zeros(3, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# Feature equivariance
# ---------------------------------------------------------------------------------------------


def flip_grid_and_valid(batch, valid_hw, canvas=32, cells=8):
    transform = ViewTransform(flip=True, scale=1.0, origin_yx=(0.0, 0.0), valid_hw=valid_hw)
    grid = view_grid(transform, (canvas, canvas), (cells, cells))
    valid = view_valid_cells(transform, (canvas, canvas), (cells, cells))
    return grid[None].expand(batch, -1, -1, -1), valid[None].expand(batch, -1, -1)


def test_equivariance_loss_is_zero_for_exactly_transformed_features():
    first = torch.randn(2, 5, 8, 8)
    grid, valid = flip_grid_and_valid(2, (32, 32))  # cell centres land exactly on cell centres
    second = first.flip(-1)
    loss = feature_equivariance_loss(second, first, grid, valid)
    assert loss.abs().item() < 1e-6


def test_equivariance_loss_ignores_invalid_cells():
    first = torch.randn(1, 5, 8, 8)
    grid, valid = flip_grid_and_valid(1, (20, 24))  # valid cells: 5 rows x 6 columns
    second = torch.randn(1, 5, 8, 8)
    second[..., :5, :6] = first[..., :5, :6].flip(-1)  # the flip of the valid region 24 px = 6 cells
    assert valid.sum().item() == 30
    assert feature_equivariance_loss(second, first, grid, valid).abs().item() < 1e-6


def test_equivariance_loss_is_positive_otherwise_and_both_sides_get_gradients():
    first = torch.randn(2, 5, 8, 8, requires_grad=True)
    second = torch.randn(2, 5, 8, 8, requires_grad=True)
    grid, valid = flip_grid_and_valid(2, (32, 32))
    loss = feature_equivariance_loss(second, first, grid, valid)
    assert loss.item() > 0.1
    loss.backward()
    assert first.grad.abs().sum() > 0 and second.grad.abs().sum() > 0


def test_equivariance_loss_without_valid_cells_is_zero_in_the_graph():
    first = torch.randn(1, 3, 4, 4, requires_grad=True)
    second = torch.randn(1, 3, 4, 4, requires_grad=True)
    grid = torch.zeros(1, 4, 4, 2)
    loss = feature_equivariance_loss(second, first, grid, torch.zeros(1, 4, 4, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad


def test_equivariance_loss_checks_shapes():
    first = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="grid"):
        feature_equivariance_loss(first, first, torch.zeros(1, 4, 5, 2), torch.ones(1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="valid"):
        feature_equivariance_loss(first, first, torch.zeros(1, 4, 4, 2), torch.ones(1, 4, 5, dtype=torch.bool))
