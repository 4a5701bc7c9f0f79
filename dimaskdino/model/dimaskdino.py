"""DI-MaskDINO assembled: backbone -> pixel decoder -> first selection (+ mask-enhanced boxes)
-> [TI + second selection] -> [+ denoising queries] -> decoder (with BATO) -> per-layer heads.

With `di`/`bato` switched off this is MaskDINO (one selection of `num_queries` tokens, no TI, no
BATO). See `DIMaskDINO.forward` for the output dictionary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dimaskdino.model.backbone import ResNet, build_backbone
from dimaskdino.model.decoder import Decoder, DecoderOutput
from dimaskdino.model.denoising import DenoisingGenerator
from dimaskdino.model.di import BalanceAwareTokenOptimization, TokenInteraction
from dimaskdino.model.heads import PredictionHeads, masks_from_embeddings
from dimaskdino.model.layers import inverse_sigmoid
from dimaskdino.model.pixel_decoder import PixelDecoder
from dimaskdino.model.query_selection import TokenSelection, encoder_proposals, mask_enhanced_boxes

Prediction = dict[str, torch.Tensor]
TRAIN_MASKS = ("auto", "full", "points")


class DIMaskDINO(nn.Module):
    def __init__(
        self,
        backbone: ResNet,
        pixel_decoder: PixelDecoder,
        heads: PredictionHeads,
        token_selection: TokenSelection,
        decoder: Decoder,
        token_interaction: TokenInteraction | None,
        denoising: DenoisingGenerator | None,
        num_queries: int,
        num_first_selection: int,
        mask_enhanced_boxes: bool = True,
        pixel_mean: tuple[float, ...] = (123.675, 116.28, 103.53),
        pixel_std: tuple[float, ...] = (58.395, 57.12, 57.375),
        size_divisibility: int = 32,
        train_masks: str = "auto",
        hybrid: nn.Module | None = None,
        hybrid_masks: bool = False,
        expose_embeddings: bool = False,
        zero_train_padding: bool = False,
        mask_box_style: str = "authors",
        proposal_sizes: str = "authors",
    ):
        super().__init__()
        if train_masks not in TRAIN_MASKS:
            raise ValueError(f"DIMaskDINO: train_masks must be one of {TRAIN_MASKS}, got {train_masks!r}")
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.heads = heads
        self.token_selection = token_selection
        self.token_interaction = token_interaction
        self.denoising = denoising
        self.decoder = decoder
        self.num_queries = num_queries
        # Without TI the first selection feeds the decoder directly, so it has num_queries tokens.
        self.num_first_selection = num_first_selection if token_interaction is not None else num_queries
        self.use_mask_enhanced_boxes = mask_enhanced_boxes
        self.size_divisibility = size_divisibility
        # Mask outputs in training: "full" (B, Q, H/4, W/4) logits, "points" (mask embeddings +
        # features: the matcher and criterion make logits only at their points), "auto" (points
        # on a CUDA device, full elsewhere). Evaluation always gets full logits.
        self.train_masks = train_masks
        # Training-only extras (SPEC section 6); never run in eval mode, so inference is unchanged.
        # hybrid: Co-DETR's auxiliary heads, whose positive boxes make extra decoder query groups
        # (output "hybrid"); hybrid_masks: those queries also predict masks. expose_embeddings:
        # the final output also carries "mask_embed" and "mask_features" (instance-unique querying).
        self.hybrid = hybrid
        self.hybrid_masks = hybrid_masks
        self.expose_embeddings = expose_embeddings
        # Evaluation zeroes the padding outside image_sizes (detectron2 pads after normalizing);
        # training keeps the LSJ canvas padding (pixel 128, normalized) that the authors' model
        # sees, unless zero_train_padding (the engine's former behaviour).
        self.zero_train_padding = zero_train_padding
        # Mask-enhanced boxes as the authors make them or "pixel_edges" (the former ones); proposal
        # sizes in the authors' level order or "by_stride" (config.ModelConfig says more).
        self.mask_box_style = mask_box_style
        self.proposal_sizes = proposal_sizes
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, 3, 1, 1), False)

    @property
    def num_decoder_layers(self) -> int:
        return len(self.decoder.layers)

    def fsdp_units(self) -> list[nn.Module]:
        """Modules that FSDP shards as separate units (the root, with the shared heads, is the last)."""
        units = [self.backbone, *self.pixel_decoder.layers, *self.decoder.layers]
        if self.token_interaction is not None:
            units += list(self.token_interaction.layers)
        if self.hybrid is not None:
            units.append(self.hybrid)
        return units

    def final_output_key(self) -> str:
        return f"dec{self.num_decoder_layers - 1}"

    def output_keys(self) -> list[str]:
        """Keys of the per-output prediction dicts this model returns (besides "dn")."""
        keys = ["interm"]
        if self.token_interaction is not None:
            keys += [f"ti{i}" for i in range(len(self.token_interaction.layers))]
        return keys + ["init"] + [f"dec{i}" for i in range(self.num_decoder_layers)]

    def uses_point_masks(self, device: torch.device) -> bool:
        """Whether a forward on `device` in the current mode returns "mask_embed" + "mask_features"
        instead of "masks"."""
        if not self.training:
            return False
        return self.train_masks == "points" or (self.train_masks == "auto" and device.type == "cuda")

    # -----------------------------------------------------------------------------------------

    def _check_inputs(self, images, targets, image_sizes) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"DIMaskDINO: 'images' must be a (B, 3, H, W) tensor of RGB 0..255, got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"DIMaskDINO: 'images' must be floating point (RGB 0..255), got {images.dtype}")
        batch, _, height, width = images.shape
        if image_sizes is not None:
            if len(image_sizes) != batch:
                raise ValueError(f"DIMaskDINO: 'image_sizes' has {len(image_sizes)} entries for {batch} images")
            for index, (h, w) in enumerate(image_sizes):
                if not (0 < h <= height and 0 < w <= width):
                    raise ValueError(
                        f"DIMaskDINO: image_sizes[{index}] = ({h}, {w}) is outside the padded size ({height}, {width})"
                    )
        if targets is not None:
            if len(targets) != batch:
                raise ValueError(f"DIMaskDINO: 'targets' has {len(targets)} entries for {batch} images")
            for index, target in enumerate(targets):
                labels, boxes = target.get("labels"), target.get("boxes")
                if labels is None or boxes is None:
                    raise ValueError(f"DIMaskDINO: targets[{index}] needs 'labels' and 'boxes'")
                if labels.dim() != 1 or boxes.shape != (labels.shape[0], 4):
                    raise ValueError(
                        f"DIMaskDINO: targets[{index}]: 'labels' must be (N,) and 'boxes' (N, 4), got "
                        f"{tuple(labels.shape)} and {tuple(boxes.shape)}"
                    )
                if labels.is_floating_point():
                    raise ValueError(f"DIMaskDINO: targets[{index}]['labels'] must be integer, got {labels.dtype}")

    def _preprocess(self, images: torch.Tensor, image_sizes) -> torch.Tensor:
        """Normalize; in evaluation (or with zero_train_padding) zero the padding outside
        image_sizes (so it reads as the mean colour, as detectron2 pads after normalizing); pad H
        and W up to a multiple of size_divisibility with zeros (detectron2's ImageList)."""
        x = (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)
        batch, _, height, width = images.shape
        if image_sizes is not None and (not self.training or self.zero_train_padding):
            sizes = torch.tensor(image_sizes, dtype=torch.int64, device=images.device)  # (B, 2)
            rows = torch.arange(height, device=images.device)[None, :, None] < sizes[:, 0, None, None]
            cols = torch.arange(width, device=images.device)[None, None, :] < sizes[:, 1, None, None]
            x = x * (rows & cols)[:, None].to(x.dtype)
        divisor = self.size_divisibility
        pad_h = math.ceil(height / divisor) * divisor - height
        pad_w = math.ceil(width / divisor) * divisor - width
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return x

    # -----------------------------------------------------------------------------------------

    def forward(
        self,
        images: torch.Tensor,
        targets: list[dict[str, torch.Tensor]] | None = None,
        image_sizes: list[tuple[int, int]] | None = None,
        intermediate_masks: bool = True,
        generators: list[torch.Generator] | None = None,
        dn_max_gt: int | None = None,
        auxiliary: bool = True,
    ) -> dict:
        """images (B, 3, H, W) RGB 0..255, already batched/padded; targets (training only, for
        denoising): per image {"labels" (N,), "boxes" (N, 4) normalized cxcywh of the padded image}.

        Returns a dict of prediction dicts {"logits" (B, Q, C), "boxes" (B, Q, 4) sigmoid cxcywh,
        "masks" (B, Q, H/4, W/4) logits}:
          "interm": the first-selection tokens (k1 = 600 with DI, num_queries without);
          "ti0", "ti1": (DI only) every first-selection token after each TI layer, no "masks";
          "init": the decoder's input queries; "dec0" ... "dec{N-1}": each decoder layer
            ("dec{N-1}" is the final output);
          "dn": None, or {"num_groups": G, "single_pad": M, "init": ..., "dec0": ...} over the
            G*M denoising queries (query g*M + i <-> GT i of its image).
        Boxes are relative to the input's (H, W). If H or W is not a multiple of 32 the model pads
        internally and crops the masks back to ceil(H/4) x ceil(W/4).

        generators (one per image) and dn_max_gt (the largest GT count per image over all
        processes) make denoising independent of how a global batch is split (see train.py).

        In training with targets and hybrid heads (and auxiliary=True), "hybrid" is
        {"losses": the auxiliary heads' weighted losses, "groups": {head: {"matches": per image
        (query_idx, gt_idx), "dec0": ..., "dec{N-1}": ...}}}: each head's positive queries through
        the decoder (separately from the matching queries, whose outputs are unchanged).

        intermediate_masks=False (inference without per-layer evaluation) skips the mask logits
        of "init" and of every decoder layer but the last: at 800x1333 each set is 300 x 200 x 336.

        In training with point masks (`uses_point_masks`, from `train_masks`), every prediction
        dict that would have "masks" has "mask_embed" (B, Q, d) and "mask_features" (B, d, h, w)
        (a shared tensor, the BATO-updated one for dec1..; cropped like the masks) instead: its
        mask logits are mask_embed . mask_features, made by the matcher and the criterion only at
        the points they sample (see dimaskdino.ops.mask_loss).
        """
        self._check_inputs(images, targets, image_sizes)
        height, width = images.shape[-2:]
        x = self._preprocess(images, image_sizes)
        padded_height, padded_width = x.shape[-2:]
        # Internal boxes are relative to the padded frame; this converts them to the input's.
        to_input = x.new_tensor([padded_width / width, padded_height / height] * 2)
        needs_rescale = (padded_height, padded_width) != (height, width)

        encoded = self.pixel_decoder(self.backbone(x))
        outputs: dict = {}
        point_masks = self.uses_point_masks(x.device)
        queries, boxes = self._select_queries(encoded, outputs, point_masks)

        if self.training and targets is not None and needs_rescale:  # GT boxes in the padded frame
            targets = [{**t, "boxes": t["boxes"].to(x.dtype) / to_input} for t in targets]
        # Denoising queries go first; they never pass through TI.
        denoising = None
        if self.training and targets is not None and self.denoising is not None:
            denoising = self.denoising(targets, num_matching=queries.shape[1], generators=generators, max_gt=dn_max_gt)
        num_denoising, blocked = 0, None
        if denoising is not None:
            num_denoising, blocked = denoising.num_queries, denoising.self_attn_blocked
            queries = torch.cat((denoising.content.to(queries.dtype), queries), dim=1)
            boxes = torch.cat((denoising.boxes.to(boxes.dtype), boxes), dim=1)

        # The authors' decoder takes its boxes in inverse-sigmoid space: sigmoid(logit(b)) is b
        # except where the eps clamp of inverse_sigmoid bites (a coordinate within 1e-5 of 0 or 1).
        boxes = inverse_sigmoid(boxes).sigmoid()
        predictions, decoded = self._decode(queries, boxes, encoded, blocked, num_denoising, intermediate_masks, point_masks)
        outputs["dn"] = None
        if denoising is not None:
            outputs["dn"] = {"num_groups": denoising.num_groups, "single_pad": denoising.single_pad}
        for key, prediction in predictions.items():
            if denoising is not None:
                # "mask_features" (point masks) is per image, not per query: shared, not split.
                outputs["dn"][key] = {
                    name: value if name == "mask_features" else value[:, :num_denoising] for name, value in prediction.items()
                }
                prediction = {
                    name: value if name == "mask_features" else value[:, num_denoising:] for name, value in prediction.items()
                }
            outputs[key] = prediction

        if self.training and denoising is None and self.denoising is not None:
            # Keeps the label embedding in the graph when no denoising ran (distributed training
            # expects every parameter to get a gradient); adds exactly zero.
            final = outputs[self.final_output_key()]
            final["logits"] = final["logits"] + 0.0 * self.denoising.label_enc.weight.sum()

        if self.training and targets is not None and self.hybrid is not None and auxiliary:
            outputs["hybrid"] = self._decode_hybrid(encoded, decoded, targets, (padded_height, padded_width), generators, point_masks)

        if needs_rescale:
            _to_input_frame(outputs, to_input, (math.ceil(height / 4), math.ceil(width / 4)))
        return outputs

    def _select_queries(self, encoded, outputs: dict, point_masks: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """First selection ("interm" output), mask-enhanced boxes, then with DI the token
        interaction ("ti{i}" outputs) and the second selection. Returns the matching queries'
        content (B, Q, d) and boxes (B, Q, 4) for the decoder."""
        heads = self.heads
        proposals, valid = encoder_proposals(encoded.shapes, encoded.memory.device, self.proposal_sizes)
        selection = self.token_selection(encoded.memory, proposals, valid, heads, self.num_first_selection)
        interm = heads.predict(selection.content, encoded.mask_features, point_masks=point_masks)
        interm["boxes"] = selection.boxes
        outputs["interm"] = interm

        # The decoder side starts from detached content and boxes.
        boxes = selection.boxes.detach()
        if self.use_mask_enhanced_boxes:
            if point_masks:  # the boxes need full masks: made without autograd, then dropped
                with torch.no_grad():
                    interm_masks = masks_from_embeddings(interm["mask_embed"], encoded.mask_features)
            else:
                interm_masks = interm["masks"].detach()
            boxes = mask_enhanced_boxes(interm_masks, boxes if self.mask_box_style == "pixel_edges" else None)
        content = selection.content.detach()
        if self.token_interaction is None:
            return content, boxes
        interaction = self.token_interaction(content, boxes, heads, self.num_queries)
        for index, layer_output in enumerate(interaction.layer_outputs):
            outputs[f"ti{index}"] = layer_output
        return interaction.queries, interaction.boxes

    def _decode(
        self, queries, boxes, encoded, blocked, num_denoising: int, intermediate_masks: bool, point_masks: bool = False
    ) -> dict:
        """The initial prediction from the decoder's input queries, then every decoder layer's:
        {"init": ..., "dec0": ..., ...} over all queries (denoising ones included); and the
        decoder's output (BATO's memory and mask features, for the hybrid queries)."""
        heads = self.heads
        initial = heads.predict(queries, encoded.mask_features, with_masks=intermediate_masks, point_masks=point_masks)
        initial["boxes"] = boxes
        predictions = {"init": initial}
        decoded = self.decoder(queries, boxes, encoded, heads, blocked, num_denoising)
        last = len(decoded.hidden) - 1
        for index, (hidden, reference) in enumerate(zip(decoded.hidden, decoded.references)):
            predictions[f"dec{index}"] = heads.predict(
                hidden, _layer_mask_features(index, encoded, decoded), reference=reference,
                with_masks=intermediate_masks or index == last, point_masks=point_masks,
                with_embeddings=self.expose_embeddings and self.training and index == last, renorm=True,
            )
        return predictions, decoded

    def _decode_hybrid(self, encoded, main: DecoderOutput, targets, padded_hw, generators, point_masks: bool) -> dict:
        """Co-DETR's customized positive queries: each auxiliary head's positive (and padding
        negative) boxes as one query group; the groups cannot see each other (nor the matching
        queries: a separate pass) and read the memory BATO made for the matching queries."""
        hybrid = self.hybrid(encoded.memory, encoded.shapes, targets, padded_hw, generators)
        names = list(hybrid.queries)
        groups = [hybrid.queries[name] for name in names]
        sizes = [group.content.shape[1] for group in groups]
        content = torch.cat([group.content for group in groups], dim=1).to(encoded.memory.dtype)
        boxes = torch.cat([group.boxes for group in groups], dim=1)
        # output_size: no device-to-host sync for the length (and fake tensors know it).
        group_of = torch.repeat_interleave(torch.arange(len(sizes), device=boxes.device), torch.tensor(sizes, device=boxes.device),
                                           output_size=sum(sizes))
        blocked = group_of[:, None] != group_of[None, :]
        decoded = self.decoder(content, boxes, encoded, self.heads, blocked, 0, bato_memory=main.bato_memory)
        out = {"losses": hybrid.losses, "groups": {name: {"matches": group.matches} for name, group in zip(names, groups)}}
        for index, (hidden, reference) in enumerate(zip(decoded.hidden, decoded.references)):
            prediction = self.heads.predict(
                hidden, _layer_mask_features(index, encoded, main), reference=reference, with_masks=self.hybrid_masks,
                point_masks=point_masks, renorm=True,
            )
            start = 0
            for name, size in zip(names, sizes):
                out["groups"][name][f"dec{index}"] = {
                    key: value if key == "mask_features" else value[:, start: start + size] for key, value in prediction.items()
                }
                start += size
        return out


def _layer_mask_features(index: int, encoded, decoded: DecoderOutput) -> torch.Tensor:
    """Outputs after BATO (decoder layers 1..N-1) use the updated mask features."""
    if index >= 1 and decoded.updated_mask_features is not None:
        return decoded.updated_mask_features
    return encoded.mask_features


def _to_input_frame(outputs: dict, to_input: torch.Tensor, mask_size: tuple[int, int]) -> None:
    """Boxes relative to the input's (H, W) instead of the padded frame; masks cropped to it."""

    def convert(prediction: Prediction) -> None:
        if "boxes" in prediction:
            prediction["boxes"] = prediction["boxes"] * to_input.to(prediction["boxes"].dtype)
        if "masks" in prediction:
            prediction["masks"] = prediction["masks"][..., : mask_size[0], : mask_size[1]]
        if "mask_features" in prediction:  # a view: point masks are then relative to the cropped map
            prediction["mask_features"] = prediction["mask_features"][..., : mask_size[0], : mask_size[1]]

    for key, value in outputs.items():
        if key == "dn":
            if value is not None:
                for sub_key, sub_value in value.items():
                    if isinstance(sub_value, dict):
                        convert(sub_value)
        elif key == "hybrid":
            for group in value["groups"].values():
                for sub_key, sub_value in group.items():
                    if sub_key != "matches":
                        convert(sub_value)
        elif isinstance(value, dict):
            convert(value)


def build_model(cfg) -> DIMaskDINO:
    """Build DI-MaskDINO (or MaskDINO with DI and BATO off) from a `dimaskdino.config.Config`."""
    from dimaskdino.config import validate

    validate(cfg)
    model_cfg = cfg.model
    hidden = model_cfg.hidden_dim
    impl = cfg.impl
    backbone = build_backbone(
        model_cfg.backbone.depth, model_cfg.backbone.norm, model_cfg.backbone.weights,
        model_cfg.backbone.stem_channels, model_cfg.backbone.base_width,
    )
    enc = model_cfg.encoder
    pixel_decoder = PixelDecoder(
        backbone.out_channels,
        hidden_dim=hidden,
        num_layers=enc.num_layers,
        num_heads=enc.num_heads,
        num_points=enc.num_points,
        dim_feedforward=enc.dim_feedforward,
        impl=impl,
    )
    heads = PredictionHeads(hidden, model_cfg.num_classes)
    bato = None
    if model_cfg.bato.enabled:
        bato = BalanceAwareTokenOptimization(
            hidden, model_cfg.bato.num_heads, model_cfg.bato.dim_feedforward, model_cfg.bato.num_guiding_tokens, impl
        )
    dec = model_cfg.decoder
    decoder = Decoder(
        hidden,
        num_layers=dec.num_layers,
        num_heads=dec.num_heads,
        num_points=dec.num_points,
        dim_feedforward=dec.dim_feedforward,
        num_levels=pixel_decoder.num_levels,
        impl=impl,
        bato=bato,
    )
    token_interaction = None
    if model_cfg.di.enabled:
        token_interaction = TokenInteraction(
            hidden, model_cfg.di.num_ti_layers, model_cfg.di.num_heads, model_cfg.di.dim_feedforward
        )
    denoising = None
    if model_cfg.denoising.enabled:
        dn = model_cfg.denoising
        denoising = DenoisingGenerator(
            model_cfg.num_classes, hidden, dn.num_queries, dn.label_noise_prob, dn.box_noise_scale
        )
    token_selection = TokenSelection(hidden, impl)
    # Built last, so that the switch leaves the initial weights of everything else unchanged.
    hybrid = None
    if cfg.train.hybrid_heads:
        from dimaskdino.model.hybrid import HybridHeads

        hybrid = HybridHeads(
            hidden, model_cfg.num_classes, pixel_decoder.num_levels, tuple(cfg.train.hybrid_heads),
            max_positives=cfg.train.hybrid_max_positives, aux_weight=cfg.train.hybrid_aux_weight,
        )
    if cfg.train.amp == "fp16":  # the authors' recipe: these run in float32 under fp16 autocast
        for module in [pixel_decoder, *decoder.layers] + ([token_interaction] if token_interaction is not None else []):
            module.fp32_island = True
    model = DIMaskDINO(
        backbone=backbone,
        pixel_decoder=pixel_decoder,
        heads=heads,
        token_selection=token_selection,
        decoder=decoder,
        token_interaction=token_interaction,
        denoising=denoising,
        num_queries=model_cfg.num_queries,
        num_first_selection=model_cfg.di.num_first_selection,
        mask_enhanced_boxes=model_cfg.mask_enhanced_boxes,
        pixel_mean=model_cfg.pixel_mean,
        pixel_std=model_cfg.pixel_std,
        size_divisibility=model_cfg.size_divisibility,
        train_masks=model_cfg.train_masks,
        hybrid=hybrid,
        hybrid_masks=cfg.train.hybrid_masks,
        expose_embeddings=cfg.train.inter_scene or cfg.train.equivariance,
        zero_train_padding=model_cfg.zero_train_padding,
        mask_box_style=model_cfg.mask_box_style,
        proposal_sizes=model_cfg.proposal_sizes,
    )
    # Evaluation autocast on a GPU (evaluate.autocast_for): bf16 with train.amp=bf16; the authors
    # evaluate in fp32 (detectron2's inference has no autocast).
    model.inference_dtype = torch.bfloat16 if cfg.train.amp == "bf16" else torch.float32
    return model


__all__ = ["DIMaskDINO", "build_model"]
