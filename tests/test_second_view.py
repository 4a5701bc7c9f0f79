"""The second view g(I): exact flips, crops that move and zoom boxes, dropped instances, the
feature-resolution grid, and reproducible views from SecondViewLoader."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dimaskdino.data.second_view import (
    SecondViewLoader,
    ViewTransform,
    make_second_view,
    sample_view_transform,
    view_grid,
    view_valid_cells,
)
from dimaskdino.model.box_ops import box_xyxy_to_cxcywh, masks_to_boxes

CANVAS = 32  # a power of two: normalized pixel centres are exact in float32
PAD = (1.0, 2.0, 3.0)


def box_mask(y0, y1, x0, x1, size=CANVAS):
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def target(masks, labels, image_id=3):
    masks = torch.stack(masks)
    return {
        "labels": torch.tensor(labels, dtype=torch.int64),
        "boxes": box_xyxy_to_cxcywh(masks_to_boxes(masks) / CANVAS),
        "masks": masks,
        "image_id": image_id,
        "orig_size": (480, 640),
    }


def random_image(valid_hw, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.tensor(PAD).view(3, 1, 1).repeat(1, CANVAS, CANVAS)
    image[:, : valid_hw[0], : valid_hw[1]] = torch.randint(0, 256, (3, *valid_hw), generator=g).float()
    return image


def test_flip_only_reproduces_torch_flip_of_the_valid_region():
    vh, vw = 20, 24
    image = random_image((vh, vw))[None]
    masks = [box_mask(2, 9, 1, 7), box_mask(10, 20, 15, 24), torch.rand(CANVAS, CANVAS) > 0.5]
    masks[2][vh:] = False
    masks[2][:, vw:] = False
    flip = ViewTransform(flip=True, scale=1.0, origin_yx=(0.0, 0.0), valid_hw=(vh, vw))
    images, (second,) = make_second_view(image, [(vh, vw)], [target(masks, [4, 5, 6])], [flip], PAD)

    assert torch.equal(images[0, :, :vh, :vw], image[0, :, :vh, :vw].flip(-1))
    padding = torch.ones(CANVAS, CANVAS, dtype=torch.bool)
    padding[:vh, :vw] = False
    assert torch.equal(images[0][:, padding], torch.tensor(PAD)[:, None].expand(3, int(padding.sum())))

    expected_masks = torch.zeros(3, CANVAS, CANVAS, dtype=torch.bool)
    expected_masks[:, :vh, :vw] = torch.stack(masks)[:, :vh, :vw].flip(-1)
    assert torch.equal(second["masks"], expected_masks)
    assert second["labels"].tolist() == [4, 5, 6]
    # Box of the first mask: columns 1..6 -> 24 - 7 .. 24 - 1 = 17..23.
    assert torch.allclose(second["boxes"][0], box_xyxy_to_cxcywh(torch.tensor([17.0, 2, 23, 9]) / CANVAS))


def test_crop_moves_and_zooms_a_box():
    # Second-view pixel centre y + 0.5 comes from 8 + 0.5 (y + 0.5): rows 12..19 of the first view
    # cover second-view rows 8..23 (sample >= 0.5), and columns 8..15 (origin x 4) columns 8..23.
    crop = ViewTransform(flip=False, scale=0.5, origin_yx=(8.0, 4.0), valid_hw=(CANVAS, CANVAS))
    image = random_image((CANVAS, CANVAS))[None]
    _, (second,) = make_second_view(image, [(CANVAS, CANVAS)], [target([box_mask(12, 20, 8, 16)], [2])], [crop], PAD)
    assert torch.equal(second["masks"][0], box_mask(8, 24, 8, 24))
    assert torch.allclose(second["boxes"][0], box_xyxy_to_cxcywh(torch.tensor([8.0, 8, 24, 24]) / CANVAS))


def test_flip_and_crop_compose_in_that_order():
    # Flip first: columns 8..15 of a 32-wide region -> 16..23; then the crop from x = 16 at
    # scale 0.5 zooms them to columns 0..15.
    transform = ViewTransform(flip=True, scale=0.5, origin_yx=(0.0, 16.0), valid_hw=(CANVAS, CANVAS))
    image = random_image((CANVAS, CANVAS))[None]
    _, (second,) = make_second_view(image, [(CANVAS, CANVAS)], [target([box_mask(0, 16, 8, 16)], [1])], [transform], PAD)
    assert torch.equal(second["masks"][0], box_mask(0, 32, 0, 16))


def test_boxes_are_the_tight_boxes_of_the_new_masks():
    rng = np.random.default_rng(4)
    valid_hw = (28, 30)
    masks = [box_mask(3, 20, 5, 25), box_mask(14, 28, 0, 12), box_mask(0, 6, 20, 30)]
    transform = sample_view_transform(rng, valid_hw, min_scale=0.6)
    images, (second,) = make_second_view(random_image(valid_hw)[None], [valid_hw], [target(masks, [0, 1, 2])], [transform], PAD)
    assert len(second["masks"]) >= 1
    expected = box_xyxy_to_cxcywh(masks_to_boxes(second["masks"]) / CANVAS)
    assert second["boxes"].dtype == torch.float32
    assert torch.allclose(second["boxes"], expected)
    assert not second["masks"][:, valid_hw[0]:].any() and not second["masks"][:, :, valid_hw[1]:].any()
    assert second["image_id"] == 3 and second["orig_size"] == (480, 640)


def test_an_instance_cropped_away_is_dropped_with_its_label():
    # The crop keeps rows 16..31 of the first view: the instance in rows 0..5 leaves the view.
    crop = ViewTransform(flip=False, scale=0.5, origin_yx=(16.0, 0.0), valid_hw=(CANVAS, CANVAS))
    masks = [box_mask(0, 6, 0, 10), box_mask(18, 30, 2, 12)]
    _, (second,) = make_second_view(random_image((CANVAS, CANVAS))[None], [(CANVAS, CANVAS)], [target(masks, [5, 7])], [crop], PAD)
    assert second["labels"].tolist() == [7]
    assert second["masks"].shape == (1, CANVAS, CANVAS) and second["boxes"].shape == (1, 4)


def test_a_target_without_instances_stays_empty():
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4),
             "masks": torch.zeros(0, CANVAS, CANVAS, dtype=torch.bool), "image_id": 1, "orig_size": (5, 5)}
    transform = ViewTransform(flip=True, scale=0.7, origin_yx=(1.0, 2.0), valid_hw=(CANVAS, CANVAS))
    _, (second,) = make_second_view(random_image((CANVAS, CANVAS))[None], [(CANVAS, CANVAS)], [empty], [transform], PAD)
    assert second["masks"].shape == (0, CANVAS, CANVAS) and second["boxes"].shape == (0, 4)


def test_feature_grid_agrees_with_the_image_grid():
    # A linear ramp: bilinear sampling and average pooling are both exact on it, so pooling the
    # second view must equal sampling the pooled first view at the feature grid (away from the
    # border, where clamping and zero padding differ).
    size, valid_hw = 64, (64, 64)
    ys = torch.arange(size, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(size, dtype=torch.float32)[None, :] + 0.5
    image = torch.stack((3.0 * xs + 1.0 * ys, -2.0 * xs + 0.5 * ys, xs + ys))[None]
    transform = ViewTransform(flip=True, scale=0.75, origin_yx=(5.0, 9.0), valid_hw=valid_hw)
    second, _ = make_second_view(image, [valid_hw], [target([box_mask(0, 4, 0, 4, size)], [0])], [transform], PAD)

    features_first = F.avg_pool2d(image, 4)
    features_second = F.avg_pool2d(second, 4)
    grid = view_grid(transform, (size, size), (size // 4, size // 4))
    sampled = F.grid_sample(features_first, grid[None], mode="bilinear", align_corners=False)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    assert torch.allclose(sampled[inner], features_second[inner], atol=1e-3)


def test_valid_cells_follow_the_valid_region():
    transform = ViewTransform(flip=False, scale=1.0, origin_yx=(0.0, 0.0), valid_hw=(20, 9))
    cells = view_valid_cells(transform, (CANVAS, CANVAS), (8, 8))
    assert cells.sum().item() == 5 * 2  # row centres 2, 6, .., 18 < 20; column centres 2, 6 < 9
    assert cells[:5, :2].all()


def test_view_grid_checks_the_canvas():
    transform = ViewTransform(flip=False, scale=1.0, origin_yx=(0.0, 0.0), valid_hw=(40, 9))
    with pytest.raises(ValueError, match="canvas_hw"):
        view_grid(transform, (CANVAS, CANVAS), (8, 8))


def test_sampled_transforms_stay_inside_the_valid_region():
    rng = np.random.default_rng(0)
    flips = []
    for _ in range(200):
        t = sample_view_transform(rng, (30, 50), min_scale=0.3)
        assert 0.3 <= t.scale <= 1.0
        assert 0.0 <= t.origin_yx[0] <= (1 - t.scale) * 30 + 1e-9
        assert 0.0 <= t.origin_yx[1] <= (1 - t.scale) * 50 + 1e-9
        flips.append(t.flip)
    assert 60 < sum(flips) < 140
    with pytest.raises(ValueError, match="min_scale"):
        sample_view_transform(rng, (30, 50), min_scale=0.0)


def test_make_second_view_checks_the_transforms():
    transform = ViewTransform(flip=False, scale=1.0, origin_yx=(0.0, 0.0), valid_hw=(20, 20))
    batch = (random_image((CANVAS, CANVAS))[None], [(CANVAS, CANVAS)], [target([box_mask(0, 4, 0, 4)], [0])])
    with pytest.raises(ValueError, match="transforms"):
        make_second_view(*batch, [transform], PAD)
    with pytest.raises(ValueError, match="transforms"):
        make_second_view(*batch, [], PAD)


# ---------------------------------------------------------------------------------------------
# Loader wrapper
# ---------------------------------------------------------------------------------------------


class FakeLoader(list):
    """A list of batches with the attributes of a training loader."""

    position = 0
    epoch = 0
    problems = "the loader's problems"


def fake_batch(image_ids):
    sizes = [(CANVAS, 28), (24, CANVAS)][: len(image_ids)]
    images = torch.stack([random_image(s, seed=i) for i, s in enumerate(sizes)])
    targets = [target([box_mask(2, 20, 3, 20), box_mask(10, 24, 8, 28)], [1, 2], image_id=i) for i in image_ids]
    for t, s in zip(targets, sizes):
        t["masks"][:, s[0]:] = False
        t["masks"][:, :, s[1]:] = False
    return {"images": images, "image_sizes": sizes, "targets": targets}


def views(loader):
    return [batch["second_view"] for batch in loader]


def test_second_view_loader_adds_reproducible_views():
    loader = FakeLoader([fake_batch([10, 11]), fake_batch([12, 13])])
    wrapped = SecondViewLoader(loader, seed=5, min_scale=0.5, pad_value=PAD)
    assert len(wrapped) == 2 and wrapped.problems == "the loader's problems" and wrapped.position == 0

    first, again = views(wrapped), views(wrapped)
    for a, b in zip(first, again):
        assert a["transforms"] == b["transforms"]
        assert torch.equal(a["images"], b["images"])
        assert a["image_sizes"] == [(CANVAS, 28), (24, CANVAS)]
        assert set(a) == {"images", "image_sizes", "targets", "transforms"}
        for ta, tb in zip(a["targets"], b["targets"]):
            assert torch.equal(ta["masks"], tb["masks"])

    loader.epoch = 1
    other = views(wrapped)
    assert all(a["transforms"] != b["transforms"] for a, b in zip(first, other))


def test_a_view_depends_only_on_seed_epoch_and_image():
    wrapped = SecondViewLoader(FakeLoader(), seed=5)
    alone = wrapped.view_transforms([(CANVAS, 28)], [11], epoch=2)
    in_batch = wrapped.view_transforms([(CANVAS, CANVAS), (CANVAS, 28)], [10, 11], epoch=2)
    assert alone[0] == in_batch[1]
    assert SecondViewLoader(FakeLoader(), seed=6).view_transforms([(CANVAS, 28)], [11], epoch=2) != alone


def test_second_view_loader_keeps_the_batch_and_checks_its_arguments():
    batch = fake_batch([10])
    out = next(iter(SecondViewLoader(FakeLoader([batch]), seed=0)))
    assert out["images"] is batch["images"] and out["targets"] is batch["targets"]
    with pytest.raises(ValueError, match="seed"):
        SecondViewLoader(FakeLoader(), seed=-1)
    with pytest.raises(ValueError, match="min_scale"):
        SecondViewLoader(FakeLoader(), seed=0, min_scale=1.5)
