"""Inference post-processing on hand-built cases."""

import math

import pytest
import torch

from dimaskdino.model.postprocess import decoder_output_names, postprocess, postprocess_all_layers

# Padded input 32 x 32 (mask logits 8 x 8 at stride 4); the valid image is 24 high, 32 wide;
# the original image is 48 x 64 (twice the valid size).
IMAGE_SIZE = (24, 32)
ORIGINAL_SIZE = (48, 64)


def hand_built():
    logits = torch.full((1, 3, 2), -5.0)
    logits[0, 0, 1] = 3.0
    logits[0, 1, 0] = 2.0
    logits[0, 2, 0] = 1.0
    logits[0, 0, 0] = -4.0  # the fourth-best pair
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.5, 0.75, 0.5, 0.5], [0.1, 0.1, 0.4, 0.4]]])
    masks = torch.full((1, 3, 8, 8), -10.0)
    masks[0, 0, 2:4, 2:6] = 10.0  # padded pixels rows 8..16, cols 8..24 -> original rows 16..32, cols 16..48
    masks[0, 1, 6:8, :] = 10.0  # only in the padding below the valid image: cropped away
    masks[0, 2] = 2.0  # everywhere: the mask is the whole image, mean probability sigmoid(2)
    return {"logits": logits, "boxes": boxes, "masks": masks}


def test_boxes_in_original_pixels():
    (result,) = postprocess(hand_built(), [IMAGE_SIZE], [ORIGINAL_SIZE], top_k=3)
    by_label_query = {(int(l), tuple(b.tolist())) for l, b in zip(result["labels"], result["boxes"])}
    # q0: padded (8, 8, 24, 24) -> x2; q1: y1 = 32 beyond the valid 24, and q2: x0, y0 < 0, are NOT
    # clipped (the authors' box_postprocess does not clip)
    expected = {(1, (16.0, 16.0, 48.0, 48.0)), (0, (16.0, 32.0, 48.0, 64.0)), (0, (-6.4, -6.4, 19.2, 19.2))}
    assert {(l, tuple(round(v, 4) for v in b)) for l, b in by_label_query} == expected


def test_scores_labels_masks_and_order():
    (result,) = postprocess(hand_built(), [IMAGE_SIZE], [ORIGINAL_SIZE], top_k=4)
    assert result["masks"].shape == (4, 48, 64) and result["masks"].dtype == torch.bool
    assert result["labels"].dtype == torch.int64 and result["boxes"].shape == (4, 4)
    scores = result["scores"]
    assert (scores[:-1] >= scores[1:]).all()  # sorted by final score

    sig = lambda x: 1 / (1 + math.exp(-x))
    # q2 (label 0, class prob sigmoid(1)) has a full mask of probability sigmoid(2)
    q2 = [i for i, b in enumerate(result["boxes"].tolist()) if b[0] < 0 and b[1] < 0]
    assert len(q2) == 1
    assert result["masks"][q2[0]].all()
    assert result["scores"][q2[0]].item() == pytest.approx(sig(1) * sig(2), rel=1e-5)
    # q1 (label 0): its mask lies in the padding, so it is empty and its score 0
    q1 = [i for i, b in enumerate(result["boxes"].tolist()) if b[1] == 32.0]
    assert not result["masks"][q1[0]].any() and result["scores"][q1[0]] == 0
    # q0 (label 1): mask covers original rows ~16..32, cols ~16..48; score = sigmoid(3) x mean prob inside
    q0 = [i for i, label in enumerate(result["labels"].tolist()) if label == 1 and result["boxes"][i, 0] == 16.0]
    mask = result["masks"][q0[0]]
    rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    assert abs(rows.min().item() - 16) <= 2 and abs(rows.max().item() - 31) <= 2
    assert abs(cols.min().item() - 16) <= 2 and abs(cols.max().item() - 47) <= 2
    assert mask[24, 32] and not mask[2, 2]
    assert sig(3) * 0.5 < result["scores"][q0[0]].item() < sig(3)
    # the fourth pair is query 0 again, with class 0, and the same mask score
    q0_class0 = [i for i, label in enumerate(result["labels"].tolist()) if label == 0 and result["boxes"][i, 0] == 16.0
                 and result["boxes"][i, 1] == 16.0]
    assert torch.equal(result["masks"][q0_class0[0]], mask)
    torch.testing.assert_close(result["scores"][q0_class0[0]] / sig(-4), result["scores"][q0[0]] / sig(3))


def test_top_k_over_query_class_pairs_allows_a_query_twice():
    pred = hand_built()
    pred["logits"][0, 0, 0] = 2.5  # query 0 is now also the second-best pair, with class 0
    (result,) = postprocess(pred, [IMAGE_SIZE], [ORIGINAL_SIZE], top_k=2)
    assert sorted(result["labels"].tolist()) == [0, 1]
    assert result["boxes"][0].tolist() == result["boxes"][1].tolist() == [16.0, 16.0, 48.0, 48.0]


def test_batch_sizes_padded_size_and_outputs_without_masks():
    pred = {k: torch.cat([v, v]) for k, v in hand_built().items()}
    results = postprocess(pred, [IMAGE_SIZE, (32, 32)], [ORIGINAL_SIZE, (16, 16)], top_k=100)
    assert len(results) == 2 and len(results[0]["scores"]) == 6  # top_k capped at Q x C
    assert results[1]["masks"].shape == (6, 16, 16)
    assert results[1]["boxes"].max() <= 16.0
    no_masks = {"logits": pred["logits"], "boxes": pred["boxes"]}
    with pytest.raises(ValueError):
        postprocess(no_masks, [IMAGE_SIZE] * 2, [ORIGINAL_SIZE] * 2)
    (result, _) = postprocess(no_masks, [IMAGE_SIZE] * 2, [ORIGINAL_SIZE] * 2, top_k=1, padded_size=(32, 32))
    assert "masks" not in result and result["scores"].item() == pytest.approx(1 / (1 + math.exp(-3)))
    assert result["boxes"][0].tolist() == [16.0, 16.0, 48.0, 48.0]


def test_every_decoder_layer():
    outputs = {"interm": hand_built(), "dec1": hand_built(), "init": hand_built(), "dec0": hand_built(),
               "dec10": hand_built(), "ti0": hand_built(), "dn": None}
    assert decoder_output_names(outputs) == ["init", "dec0", "dec1", "dec10"]
    per_layer = postprocess_all_layers(outputs, [IMAGE_SIZE], [ORIGINAL_SIZE], top_k=5)
    assert list(per_layer) == ["init", "dec0", "dec1", "dec10"]
    assert all(len(results) == 1 and results[0]["masks"].shape == (5, 48, 64) for results in per_layer.values())
