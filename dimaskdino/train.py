"""Training entry point.

    torchrun [--nproc_per_node N] -m dimaskdino.train [--preset P] [key=value ...]
    python -m dimaskdino.train [--preset P] [key=value ...]      (one process, no torchrun)

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

import dataclasses
import json
import logging
import math
import hashlib
import os
import shutil
import struct
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dimaskdino import dist as distributed
from dimaskdino._optional import MissingOptionalDependency, import_optional
from dimaskdino.amp import MixedPrecision
from dimaskdino.checkpoint import find_resumable, load_checkpoint, load_checkpoint_extra, resolve_checkpoint, save_checkpoint
from dimaskdino.cli import ArgumentParser, run_cli
from dimaskdino.config import PRESETS, Config, apply_overrides, config_to_dict, get_preset
from dimaskdino.step_guard import NonFiniteGuard, skip_flag

logger = logging.getLogger("dimaskdino.train")


# ---------------------------------------------------------------------------------------------
# Setup


def parse_args(argv: list[str] | None) -> Config:
    parser = ArgumentParser(
        prog="dimaskdino.train",
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
        cache.mkdir(parents=True, exist_ok=True)
        # A folder of its own (two runs sharing the cache may generate at the same time); the
        # first complete one is renamed into place and a later one is dropped.
        staging = Path(tempfile.mkdtemp(prefix=f"{name}.tmp", dir=cache))
        logger.info("generating the embedded synthetic dataset into %s", root)
        make_synthetic_coco(str(staging), seed=data.synthetic_seed, num_train=data.synthetic_train,
                            num_val=data.synthetic_val, height=height, width=width)
        try:
            os.rename(staging, root)  # fails when another run's copy is in place (or half-renamed)
        except OSError:
            if not os.path.exists(paths.val_json):
                raise
        shutil.rmtree(staging, ignore_errors=True)
    distributed.barrier()
    return dataclasses.replace(cfg, data=dataclasses.replace(
        data, train_json=paths.train_json, train_images=paths.train_images, val_json=paths.val_json,
        val_images=paths.val_images))


def param_groups(model: nn.Module, lr: float, weight_decay: float, backbone_lr_mult: float) -> list[dict]:
    """AdamW groups of SPEC section 5: backbone at lr x backbone_lr_mult; no weight decay for
    normalization layers and nn.Embedding tables. Free-standing parameters (the encoder's
    level_embed) are decayed, as the authors' build_optimizer does."""
    no_decay_types = (nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.modules.batchnorm._NormBase)
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, no_decay_types):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = id(param) in no_decay_ids
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


def shard_model(model: nn.Module, world_size: int) -> nn.Module:
    """FSDP2: one unit per encoder and decoder layer and the backbone, then the root (which keeps
    the shared heads together in one unit). One process gets the plain model: FSDP2 would still
    gather and scatter copies of every unit each step and make every parameter a DTensor (a slower
    optimizer step), for no memory saving. Checkpoints do not differ: DCP stores global tensors
    either way, so any world size resumes any other."""
    if world_size == 1:
        return model
    from torch.distributed.fsdp import fully_shard

    for unit in model.fsdp_units():
        fully_shard(unit)
    fully_shard(model)
    return model


def stable_seed(*values: int) -> int:
    """A 63-bit seed from integers, the same on every Python version and platform (Python's
    tuple hash is not guaranteed to be)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(values)}q", *values), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def batch_generators(seed: int, step: int, image_ids: list[int], device: torch.device, view: int = 0) -> list[torch.Generator]:
    """One generator per image, seeded by (seed, step, image id): a step's random draws do not
    depend on how the batch is split over processes or where a run resumed. view 1: the second
    view of instance-unique querying's equivariance (its own stream)."""
    generators = []
    for image_id in image_ids:
        g = torch.Generator(device=device)
        g.manual_seed(stable_seed(seed, step, int(image_id), view))
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
    dn_max_gt = denoising_max_gt(batch["targets"], cfg.model.denoising.max_gt_scope, device)
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


def denoising_max_gt(targets: list[dict], scope: str, device: torch.device) -> int:
    """The GT count that sets the denoising groups (num_queries // it): the largest of this
    process's images (scope "process", the authors' per-GPU batch), or of the whole global batch
    ("global": the groups then do not depend on how the batch is split over processes)."""
    local = max((len(t["labels"]) for t in targets), default=0)
    return distributed.all_reduce_max_int(local, device) if scope == "global" else local


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (possibly DTensor) scalar, e.g. the gradient norm under FSDP."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach()


def move_targets(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in targets]


# ---------------------------------------------------------------------------------------------
# Logging


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keeps the records of `path` with step <= last_step (rewritten atomically)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a crash
            continue
        if isinstance(record, dict) and record.get("step", 0) <= last_step:
            kept.append(line)
    staging = path.with_suffix(".jsonl.tmp")
    staging.write_text("".join(f"{line}\n" for line in kept))
    os.replace(staging, path)


class RunLog:
    """JSONL and TensorBoard on rank 0; a progress bar with loss, lr, img/s and ETA."""

    def __init__(self, output_dir: Path, enabled: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        self.jsonl = None
        self.tensorboard = None
        self.bar = None
        if not enabled:
            return
        # A run resumed at step S (or started afresh, S = 0) continues the records up to S and
        # drops the later ones of the interrupted run, which it is about to write again.
        _truncate_jsonl(output_dir / "log.jsonl", start_step)
        self.jsonl = open(output_dir / "log.jsonl", "a")
        try:
            import_optional("tensorboard", "TensorBoard logging")
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard discards the earlier events at steps >= S + 1.
            self.tensorboard = SummaryWriter(str(output_dir / "tb"), purge_step=start_step + 1)
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


@dataclasses.dataclass
class Position:
    """Where training stands: the step, the data position, the skipped steps so far."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    skipped_steps: int = 0
    checkpoint: Path | None = None  # the one resumed from


@dataclasses.dataclass
class Trainer:
    """What the loop needs, built by `setup`."""

    cfg: Config
    info: distributed.DistInfo
    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    inter_scene: Any
    train_set: Any
    val_set: Any
    categories: Any
    output_dir: Path
    checkpoint_dir: Path


def load_datasets(cfg: Config, info: distributed.DistInfo):
    """(cfg with the dataset paths and num_classes of the data, train set, val set)."""
    from dimaskdino.data import load_coco

    cfg = resolve_dataset(cfg, info)
    for key in ("train_json", "val_json", "train_images", "val_images"):
        path = getattr(cfg.data, key)
        if not os.path.exists(path):
            raise FileNotFoundError(f"data.{key}: no such {'file' if key.endswith('json') else 'folder'}: {path}")
    train_set = load_coco(cfg.data.train_json, cfg.data.train_images, for_training=True)
    # One collector for both splits: a problem of a file shared by them is reported once.
    val_set = load_coco(cfg.data.val_json, cfg.data.val_images, for_training=False, problems=train_set.problems)
    categories = train_set.categories
    if cfg.model.num_classes != categories.num_classes:
        logger.info("model.num_classes: %d -> %d (the categories of %s)", cfg.model.num_classes, categories.num_classes, cfg.data.train_json)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=categories.num_classes))
    return cfg, train_set, val_set


def setup(cfg: Config) -> Trainer:
    """Process group, data, model (sharded), criterion and optimizer."""
    from dimaskdino.model import build_model
    from dimaskdino.model.criterion import build_criterion

    info = distributed.init_distributed(cfg.train.device)
    setup_logging(info.is_main)
    # The model's outputs include views (slices of the decoder's queries); nothing modifies them
    # in place, which is what FSDP warns about.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    if cfg.train.batch_size % info.world_size != 0:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} must be divisible by the number of processes ({info.world_size})")
    cfg, train_set, val_set = load_datasets(cfg, info)

    output_dir = Path(cfg.train.output_dir)
    if info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))

    torch.manual_seed(cfg.train.seed)  # the initial weights
    model = shard_model(build_model(cfg).to(info.device), info.world_size)
    inter_scene = None
    if cfg.train.inter_scene:
        from dimaskdino.training_methods import InterSceneTerm

        inter_scene = InterSceneTerm.from_config(cfg, info.device)
    # fused: its step reads the skip flag of a non-finite step on the device (step_guard).
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.backbone_lr_mult), lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay, fused=True,
    )
    return Trainer(cfg, info, model, build_criterion(cfg), optimizer, inter_scene, train_set, val_set,
                   train_set.categories, output_dir, output_dir / "checkpoints")


def resume(t: Trainer) -> Position:
    """The position of train.resume: "auto" = the newest checkpoint of the output folder that
    verifies (a damaged newer one is reported and skipped), a path, or "" = from scratch."""
    resume_from = None
    if t.cfg.train.resume == "auto":
        resume_from = find_resumable(t.checkpoint_dir)
    elif t.cfg.train.resume:
        resume_from = resolve_checkpoint(t.cfg.train.resume)
    if resume_from is None:
        return Position()
    meta = load_checkpoint(resume_from, t.model, t.optimizer)
    if t.inter_scene is not None:
        extra = {"inter_scene": t.inter_scene.state_dict()}
        load_checkpoint_extra(resume_from, extra)
        t.inter_scene.load_state_dict(extra["inter_scene"])
    logger.info("resumed from %s (step %d, saved by %d processes, now %d)", resume_from, meta["step"],
                meta["world_size"], t.info.world_size)
    return Position(meta["step"], meta["epoch"], meta["batch_in_epoch"], meta.get("skipped_steps", 0), resume_from)


def build_loaders(t: Trainer, position: Position):
    """(train loader at the resumed position, val loader)."""
    from dimaskdino.data import build_eval_loader, build_train_loader

    cfg, info = t.cfg, t.info
    loader_args = dict(backend=cfg.data.loader, num_threads=cfg.data.num_threads, shard_id=info.rank, num_shards=info.world_size)
    if cfg.data.loader == "dali":
        loader_args["device_id"] = info.local_rank if info.device.type == "cuda" else None
    train_loader = build_train_loader(
        t.train_set, batch_size=cfg.train.batch_size // info.world_size, image_size=cfg.data.image_size,
        min_scale=cfg.data.min_scale, max_scale=cfg.data.max_scale, seed=cfg.train.seed,
        start_epoch=position.epoch, start_batch=position.batch_in_epoch, **loader_args,
    )
    if cfg.train.equivariance:
        from dimaskdino.data.second_view import SecondViewLoader

        train_loader = SecondViewLoader(train_loader, seed=cfg.train.seed, min_scale=cfg.train.equivariance_min_scale)
    val_loader = build_eval_loader(
        t.val_set, batch_size=cfg.train.eval_batch_size, short_side=cfg.data.test_short_side,
        max_size=cfg.data.test_max_size, size_divisibility=cfg.model.size_divisibility, **loader_args,
    )
    return train_loader, val_loader


def train_step(t: Trainer, batch: dict, step: int, lr_scale: float, precision: MixedPrecision,
               guard: NonFiniteGuard) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """One optimizer step (skipped on the device when the loss or gradient norm is not
    finite); returns (losses, total loss, gradient norm)."""
    for group in t.optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr_scale
    losses = step_losses(t.model, t.criterion, t.cfg, batch, step, t.info.device, precision.autocast(), t.inter_scene)
    loss = sum(losses.values())
    t.optimizer.zero_grad(set_to_none=True)
    precision.backward(loss)
    grad_norm = local_tensor(precision.unscale_and_clip(t.optimizer, t.model.parameters(), t.cfg.train.clip_grad_norm))
    skip = skip_flag(loss, grad_norm)
    precision.step(t.optimizer, skip)
    guard.record(step + 1, skip, loss, grad_norm)
    return losses, loss, grad_norm


def save(t: Trainer, step: int, data_position: int, steps_per_epoch: int, guard: NonFiniteGuard, run_log: "RunLog") -> None:
    """A checkpoint at `step` (nothing when the state is not finite: save_checkpoint says so)."""
    guard.flush()  # the skipped-step count of the checkpoint is exact
    meta = dict(epoch=data_position // steps_per_epoch, batch_in_epoch=data_position % steps_per_epoch,
                world_size=t.info.world_size, config=config_to_dict(t.cfg), categories=t.categories.state_dict(),
                skipped_steps=guard.skipped, time=time.time())
    extra = {"inter_scene": t.inter_scene.state_dict()} if t.inter_scene is not None else None
    path = save_checkpoint(t.checkpoint_dir, step, t.model, t.optimizer, meta, keep=t.cfg.train.keep_checkpoints, extra=extra)
    if path is not None:
        guard.last_checkpoint = path
        run_log.event(step, {"checkpoint": str(path)})


def train(cfg: Config) -> dict:
    """Runs training as configured; returns the final metrics (rank 0; {} on other ranks)."""
    from dimaskdino.evaluate import evaluate_model

    t_start = time.time()
    t = setup(cfg)
    cfg, info = t.cfg, t.info
    position = resume(t)
    train_loader, val_loader = build_loaders(t, position)
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
            "DI-MaskDINO" if cfg.model.di.enabled else "MaskDINO", info.world_size, info.device, cfg.train.batch_size,
            cfg.train.batch_size // info.world_size, total_steps, total_steps / steps_per_epoch, steps_per_epoch, t.output_dir,
        )
    step = position.step
    run_log = RunLog(t.output_dir, info.is_main, total_steps, step)
    precision = MixedPrecision(cfg.train.amp, info.device)  # bf16 on a GPU unless train.amp says otherwise
    guard = NonFiniteGuard(cfg.train.max_bad_steps, skipped_before=position.skipped_steps, report=info.is_main)
    guard.last_checkpoint = position.checkpoint

    metrics: dict = {}
    t.model.train()
    window_start, window_images = time.time(), 0
    try:
        while step < total_steps:
            for batch in train_loader:
                lr_scale = lr_factor(step, cfg.train.warmup_iters, drop_steps)
                losses, loss, grad_norm = train_step(t, batch, step, lr_scale, precision, guard)
                step += 1
                window_images += cfg.train.batch_size
                run_log.advance()
                done = step >= total_steps
                if step % cfg.train.log_period == 0 or done:
                    reduced = distributed.all_reduce_mean(dict(losses, loss=loss.detach(), grad_norm=grad_norm))
                    guard.flush()
                    elapsed = time.time() - window_start
                    run_log.step(step, dict(step=step, epoch=step / steps_per_epoch, lr=cfg.train.lr * lr_scale,
                                            img_per_s=window_images / max(elapsed, 1e-9), skipped_steps=guard.skipped,
                                            **reduced))
                    window_start, window_images = time.time(), 0
                if cfg.train.checkpoint_period > 0 and (step % cfg.train.checkpoint_period == 0 or done):
                    save(t, step, train_loader.position, steps_per_epoch, guard, run_log)
                if evaluate and (step % eval_every == 0 or done):
                    metrics = evaluate_model(t.model, val_loader, t.categories, cfg.data.val_json, device=info.device)
                    run_log.event(step, {f"val/{k}": v for k, v in metrics.items()})
                    if info.is_main:
                        logger.info("step %d: segm AP %.3f, bbox AP %.3f", step, metrics.get("segm/AP", float("nan")), metrics.get("bbox/AP", float("nan")))
                    t.model.train()
                if done:
                    break
        guard.flush()
    finally:
        run_log.close()
    return finish(t, metrics, step, guard, evaluate, time.time() - t_start)


def finish(t: Trainer, metrics: dict, step: int, guard: NonFiniteGuard, evaluated: bool, elapsed: float) -> dict:
    """predictions.png, metrics.json and the closing log lines."""
    info = t.info
    if evaluated:  # every rank: a forward of the sharded model is a collective
        write_prediction_picture(t.model, t.val_set, t.cfg, t.categories, t.output_dir / "predictions.png", info.device, info.is_main)
    if info.is_main:
        summary = dict(metrics, steps=step, skipped_steps=guard.skipped, train_seconds=elapsed, world_size=info.world_size,
                       device=str(info.device), data_problems=t.train_set.problems.counts())
        (t.output_dir / "metrics.json").write_text(json.dumps(summary, indent=1))
        logger.info("%s", t.train_set.problems.summary())
        if guard.skipped:
            logger.warning("%d steps were skipped (non-finite loss or gradient norm)", guard.skipped)
        logger.info("done in %.1f min: segm AP %.3f, bbox AP %.3f; outputs in %s", elapsed / 60,
                    metrics.get("segm/AP", float("nan")), metrics.get("bbox/AP", float("nan")), t.output_dir)
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


def main(argv: list[str] | None = None) -> int:
    def run() -> int:
        cfg = parse_args(argv)
        try:
            train(cfg)
        finally:
            distributed.cleanup()
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
