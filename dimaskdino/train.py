"""Training entry point.

    torchrun [--nproc_per_node N] -m dimaskdino.train [--preset P] [key=value ...]

With no arguments: the `demo` preset on the embedded synthetic dataset (generated on first use into
a cache folder), on the GPU if there is one, else on the CPU. It trains, evaluates, and writes into
`train.output_dir`: checkpoints/ (torch.distributed.checkpoint, atomic), log.jsonl, tb/
(TensorBoard), metrics.json and predictions.png (val predictions overlaid on the images).

Exact resume: the data order and augmentation are functions of (seed, epoch, image), every random
draw of a step comes from generators seeded by (seed, step, image id), and the learning rate is a
function of the step; a checkpoint stores the weights, the optimizer and the position in the data.
So `resume=auto` after a crash continues with the losses an uninterrupted run would have had, and
a run started on N processes continues on M.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from dimaskdino import dist as distributed
from dimaskdino._optional import MissingOptionalDependency, import_optional
from dimaskdino.checkpoint import latest_checkpoint, load_checkpoint, load_checkpoint_extra, resolve_checkpoint, save_checkpoint
from dimaskdino.config import PRESETS, Config, apply_overrides, config_to_dict, get_preset

logger = logging.getLogger("dimaskdino.train")


# ---------------------------------------------------------------------------------------------
# Setup


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(
        prog="torchrun -m dimaskdino.train",
        description="Train DI-MaskDINO. Overrides are key=value pairs of the config, e.g. train.lr=2e-4.",
    )
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    return apply_overrides(get_preset(args.preset), args.overrides)


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )


def resolve_dataset(cfg: Config, info: distributed.DistInfo) -> Config:
    """Fills empty data paths with the embedded synthetic dataset, generated once into the cache
    (by rank 0, into a temporary folder renamed when complete, so a crash never leaves half a
    dataset that later runs would trust)."""
    data = cfg.data
    if data.train_json and data.val_json:
        return cfg
    if bool(data.train_json) != bool(data.val_json):
        raise ValueError("data.train_json and data.val_json must be given together (or neither, for the synthetic dataset)")
    from dimaskdino.data.synthetic import SyntheticPaths, make_synthetic_coco

    height, width = data.synthetic_size
    cache = Path(data.cache_dir or os.environ.get("DIMASKDINO_CACHE", Path.home() / ".cache" / "dimaskdino")).expanduser()
    name = f"synthetic-v1-seed{data.synthetic_seed}-{height}x{width}-{data.synthetic_train}-{data.synthetic_val}"
    root = cache / name
    paths = SyntheticPaths.under(str(root))
    if info.is_main and not os.path.exists(paths.val_json):
        staging = cache / f"{name}.tmp{os.getpid()}"
        logger.info("generating the embedded synthetic dataset into %s", root)
        make_synthetic_coco(str(staging), seed=data.synthetic_seed, num_train=data.synthetic_train,
                            num_val=data.synthetic_val, height=height, width=width)
        if not os.path.exists(paths.val_json):
            os.replace(staging, root)
    distributed.barrier()
    return dataclasses.replace(cfg, data=dataclasses.replace(
        data, train_json=paths.train_json, train_images=paths.train_images, val_json=paths.val_json,
        val_images=paths.val_images))


def param_groups(model: nn.Module, lr: float, weight_decay: float, backbone_lr_mult: float) -> list[dict]:
    """AdamW groups of SPEC section 5: backbone at lr x backbone_lr_mult; no weight decay for
    normalization layers and embeddings."""
    no_decay_types = (nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.modules.batchnorm._NormBase)
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, no_decay_types):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # Free-standing embedding tables (e.g. the per-level embedding) are parameters, not modules.
        no_decay = id(param) in no_decay_ids or "embed" in name.rsplit(".", 1)[-1]
        groups.setdefault((name.startswith("backbone."), no_decay), []).append(param)
    return [
        dict(params=params, lr=lr * (backbone_lr_mult if is_backbone else 1.0),
             weight_decay=0.0 if no_decay else weight_decay, base_lr=lr * (backbone_lr_mult if is_backbone else 1.0))
        for (is_backbone, no_decay), params in sorted(groups.items())
    ]


def lr_factor(step: int, warmup_iters: int, drop_steps: list[int]) -> float:
    """Linear warmup from 0.001, then x0.1 at each drop."""
    factor = 0.1 ** sum(step >= drop for drop in drop_steps)
    if step < warmup_iters:
        alpha = step / warmup_iters
        factor *= 0.001 * (1 - alpha) + alpha
    return factor


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2: one unit per encoder and decoder layer and the backbone, then the root (which keeps
    the shared heads together in one unit)."""
    from torch.distributed.fsdp import fully_shard

    for unit in model.fsdp_units():
        fully_shard(unit)
    fully_shard(model)
    return model


def batch_generators(seed: int, step: int, image_ids: list[int], device: torch.device, view: int = 0) -> list[torch.Generator]:
    """One generator per image, seeded by (seed, step, image id): a step's random draws do not
    depend on how the batch is split over processes or where a run resumed. view 1: the second
    view of instance-unique querying's equivariance (its own stream)."""
    generators = []
    for image_id in image_ids:
        g = torch.Generator(device=device)
        key = (seed, step, int(image_id)) if view == 0 else (seed, step, int(image_id), view)
        g.manual_seed(hash(key) & 0x7FFF_FFFF_FFFF_FFFF)
        generators.append(g)
    return generators


def step_losses(model, criterion, cfg: Config, batch: dict, step: int, device: torch.device, autocast,
                inter_scene=None) -> dict[str, torch.Tensor]:
    """Every weighted loss term of one training step: the forward (of both views with
    train.equivariance), the criterion, and the instance-unique terms when switched on."""
    from dimaskdino.training_methods import equivariance_losses

    images = batch["images"].to(device, non_blocking=True)
    targets = move_targets(batch["targets"], device)
    image_ids = [t["image_id"] for t in batch["targets"]]
    generators = batch_generators(cfg.train.seed, step, image_ids, device)
    dn_max_gt = distributed.all_reduce_max_int(max((len(t["labels"]) for t in batch["targets"]), default=0), device)
    with autocast:
        outputs = model(images, targets, batch["image_sizes"], generators=generators, dn_max_gt=dn_max_gt)
        if cfg.train.equivariance:
            second_view = dict(batch["second_view"])
            second_view["images"] = second_view["images"].to(device, non_blocking=True)
            second_view["targets"] = move_targets(second_view["targets"], device)
            second_generators = batch_generators(cfg.train.seed, step, image_ids, device, view=1)
            # The second view's GT are a subset of the first's: dn_max_gt still bounds them.
            second_outputs = model(second_view["images"], second_view["targets"], second_view["image_sizes"],
                                   generators=second_generators, dn_max_gt=dn_max_gt, auxiliary=False)
    losses = criterion(outputs, targets, generators=generators)
    final_key = model.final_output_key()
    if inter_scene is not None:
        losses.update(inter_scene(outputs[final_key], targets, generators))
    if cfg.train.equivariance:
        losses.update(equivariance_losses(criterion, outputs, second_outputs, second_view, final_key,
                                          cfg.train.equivariance_weight, second_generators))
    return losses


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (possibly DTensor) scalar, e.g. the gradient norm under FSDP."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach()


def move_targets(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in targets]


# ---------------------------------------------------------------------------------------------
# Logging


class RunLog:
    """JSONL and TensorBoard on rank 0; a progress bar with loss, lr, img/s and ETA."""

    def __init__(self, output_dir: Path, enabled: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        self.jsonl = open(output_dir / "log.jsonl", "a") if enabled else None
        self.tensorboard = None
        self.bar = None
        if not enabled:
            return
        try:
            import_optional("tensorboard", "TensorBoard logging")
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(output_dir / "tb"))
        except ImportError as error:
            logger.warning("TensorBoard logging is off: %s", error)
        self.total_steps = total_steps
        self.started = time.time()
        self.start_step = start_step
        if sys.stdout.isatty():
            try:
                tqdm = import_optional("tqdm", "the progress bar").tqdm
            except MissingOptionalDependency as error:
                logger.warning("no progress bar: %s", error)
                return
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stdout,
                            mininterval=1.0)

    def step(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tensorboard.add_scalar(key, value, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", img_s=f"{record['img_per_s']:.1f}")
        else:  # a log file, not a terminal: one plain line per record instead of a redrawn bar
            done = step - self.start_step
            eta = (time.time() - self.started) / max(done, 1) * (self.total_steps - step)
            logger.info("step %d/%d  loss %.3f  lr %.2e  %.1f img/s  ETA %s", step, self.total_steps, record["loss"],
                        record["lr"], record["img_per_s"], time.strftime("%H:%M:%S", time.gmtime(eta)))

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def event(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(dict(record, step=step)) + "\n")
        self.jsonl.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


# ---------------------------------------------------------------------------------------------
# Training


def train(cfg: Config) -> dict:
    """Runs training as configured; returns the final metrics (rank 0; {} on other ranks)."""
    from dimaskdino.data import build_eval_loader, build_train_loader, load_coco
    from dimaskdino.evaluate import evaluate_model
    from dimaskdino.model import build_model
    from dimaskdino.model.criterion import build_criterion

    info = distributed.init_distributed(cfg.train.device)
    setup_logging(info.is_main)
    # The model's outputs include views (slices of the decoder's queries); nothing modifies them
    # in place, which is what FSDP warns about.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    t_start = time.time()
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    cfg = resolve_dataset(cfg, info)
    train_set = load_coco(cfg.data.train_json, cfg.data.train_images, for_training=True)
    # One collector for both splits: a file shared by them is reported once.
    val_set = load_coco(cfg.data.val_json, cfg.data.val_images, for_training=False, problems=train_set.problems)
    categories = train_set.categories
    if cfg.model.num_classes != categories.num_classes:
        logger.info("model.num_classes: %d -> %d (the categories of %s)", cfg.model.num_classes, categories.num_classes, cfg.data.train_json)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=categories.num_classes))

    output_dir = Path(cfg.train.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    if info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))

    torch.manual_seed(cfg.train.seed)  # the initial weights
    model = build_model(cfg).to(info.device)
    model = shard_model(model, info.device)
    criterion = build_criterion(cfg)
    inter_scene = None
    if cfg.train.inter_scene:
        from dimaskdino.training_methods import InterSceneTerm

        inter_scene = InterSceneTerm.from_config(cfg, info.device)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.backbone_lr_mult), lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
    )

    global_batch = cfg.train.batch_size
    if global_batch % info.world_size != 0:
        raise ValueError(f"train.batch_size={global_batch} must be divisible by the number of processes ({info.world_size})")
    local_batch = global_batch // info.world_size

    step, start_epoch, start_batch = 0, 0, 0
    resume_from = None
    if cfg.train.resume == "auto":
        resume_from = latest_checkpoint(checkpoint_dir)
    elif cfg.train.resume:
        resume_from = resolve_checkpoint(cfg.train.resume)
    if resume_from is not None:
        meta = load_checkpoint(resume_from, model, optimizer)
        if inter_scene is not None:
            extra = {"inter_scene": inter_scene.state_dict()}
            load_checkpoint_extra(resume_from, extra)
            inter_scene.load_state_dict(extra["inter_scene"])
        step, start_epoch, start_batch = meta["step"], meta["epoch"], meta["batch_in_epoch"]
        logger.info("resumed from %s (step %d, saved by %d processes, now %d)", resume_from, step, meta["world_size"], info.world_size)

    loader_args = dict(backend=cfg.data.loader, num_threads=cfg.data.num_threads, shard_id=info.rank, num_shards=info.world_size)
    if cfg.data.loader == "dali":
        loader_args["device_id"] = info.local_rank if info.device.type == "cuda" else None
    train_loader = build_train_loader(
        train_set, batch_size=local_batch, image_size=cfg.data.image_size, min_scale=cfg.data.min_scale,
        max_scale=cfg.data.max_scale, seed=cfg.train.seed, start_epoch=start_epoch, start_batch=start_batch, **loader_args,
    )
    if cfg.train.equivariance:
        from dimaskdino.data.second_view import SecondViewLoader

        train_loader = SecondViewLoader(train_loader, seed=cfg.train.seed, min_scale=cfg.train.equivariance_min_scale)
    val_loader = build_eval_loader(
        val_set, batch_size=cfg.train.eval_batch_size, short_side=cfg.data.test_short_side,
        max_size=cfg.data.test_max_size, size_divisibility=cfg.model.size_divisibility, **loader_args,
    )

    steps_per_epoch = len(train_loader)
    total_steps = math.ceil(cfg.train.epochs * steps_per_epoch)
    if cfg.train.max_steps > 0:
        total_steps = min(total_steps, cfg.train.max_steps)
    drop_steps = [round(e * steps_per_epoch) for e in cfg.train.lr_drop_epochs]
    # eval_period > 0: every that many steps and at the end; 0: at the end; < 0: never.
    eval_every = cfg.train.eval_period if cfg.train.eval_period > 0 else total_steps
    evaluate = cfg.train.eval_period >= 0
    if info.is_main:
        logger.info(
            "training %s: %d processes on %s, batch %d (%d per process), %d steps (%.1f epochs of %d steps), output %s",
            "DI-MaskDINO" if cfg.model.di.enabled else "MaskDINO", info.world_size, info.device, global_batch,
            local_batch, total_steps, total_steps / steps_per_epoch, steps_per_epoch, output_dir,
        )
    run_log = RunLog(output_dir, info.is_main, total_steps, step)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if info.device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def save(epoch: int, batch_in_epoch: int) -> None:
        meta = dict(epoch=epoch, batch_in_epoch=batch_in_epoch, world_size=info.world_size, config=config_to_dict(cfg),
                    categories=categories.state_dict(), time=time.time())
        extra = {"inter_scene": inter_scene.state_dict()} if inter_scene is not None else None
        path = save_checkpoint(checkpoint_dir, step, model, optimizer, meta, keep=cfg.train.keep_checkpoints, extra=extra)
        run_log.event(step, {"checkpoint": str(path)})

    metrics: dict = {}
    model.train()
    window_start, window_images = time.time(), 0
    while step < total_steps:
        for batch in train_loader:
            factor = lr_factor(step, cfg.train.warmup_iters, drop_steps)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            losses = step_losses(model, criterion, cfg, batch, step, info.device, autocast, inter_scene)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
            optimizer.step()
            step += 1
            window_images += global_batch
            run_log.advance()
            if step % cfg.train.log_period == 0 or step == total_steps:
                reduced = distributed.all_reduce_mean(dict(losses, loss=loss.detach(), grad_norm=local_tensor(grad_norm)))
                elapsed = time.time() - window_start
                record = dict(step=step, epoch=step / steps_per_epoch, lr=cfg.train.lr * factor,
                              img_per_s=window_images / max(elapsed, 1e-9), **reduced)
                run_log.step(step, record)
                window_start, window_images = time.time(), 0
                if not math.isfinite(record["loss"]):
                    raise FloatingPointError(f"step {step}: the loss is {record['loss']}; the last checkpoint is intact in {checkpoint_dir}")
            done = step >= total_steps
            if cfg.train.checkpoint_period > 0 and (step % cfg.train.checkpoint_period == 0 or done):
                save(train_loader.position // steps_per_epoch, train_loader.position % steps_per_epoch)
            if evaluate and (step % eval_every == 0 or done):
                metrics = evaluate_model(model, val_loader, categories, cfg.data.val_json, device=info.device)
                run_log.event(step, {f"val/{k}": v for k, v in metrics.items()})
                if info.is_main:
                    logger.info("step %d: segm AP %.3f, bbox AP %.3f", step, metrics.get("segm/AP", float("nan")), metrics.get("bbox/AP", float("nan")))
                model.train()
            if done:
                break

    run_log.close()
    elapsed = time.time() - t_start
    if evaluate:  # every rank: a forward of the sharded model is a collective
        write_prediction_picture(model, val_set, cfg, categories, output_dir / "predictions.png", info.device, info.is_main)
    if info.is_main:
        summary = dict(metrics, steps=step, train_seconds=elapsed, world_size=info.world_size, device=str(info.device),
                       data_problems=train_set.problems.counts())
        (output_dir / "metrics.json").write_text(json.dumps(summary, indent=1))
        logger.info("%s", train_set.problems.summary())
        logger.info("done in %.1f min: segm AP %.3f, bbox AP %.3f; outputs in %s", elapsed / 60,
                    metrics.get("segm/AP", float("nan")), metrics.get("bbox/AP", float("nan")), output_dir)
        metrics = summary
    distributed.barrier()
    return metrics


def write_prediction_picture(model, val_set, cfg: Config, categories, path: Path, device: torch.device, write: bool) -> None:
    """Val predictions overlaid on a few images, side by side in one PNG (written by rank 0)."""
    from dimaskdino.predict import predict_records
    from dimaskdino.visualize import save_overlay_grid

    records = val_set.records[: cfg.train.num_picture_images]
    panels = predict_records(model, records, cfg, categories, device)
    if write and panels:
        save_overlay_grid(str(path), panels)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        train(cfg)
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main()
