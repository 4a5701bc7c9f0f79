"""Run the authors' DI-MaskDINO / MaskDINO code (detectron2 based) on a CPU beside this engine.

Their repositories are never copied into this one: point environment variables at checkouts

    DIMASKDINO_AUTHORS_DIMASKDINO   github.com/CQU-ADHRI-Lab/DI-MaskDINO checkout
    DIMASKDINO_AUTHORS_MASKDINO     github.com/IDEA-Research/MaskDINO checkout
    DIMASKDINO_AUTHORS_DETECTRON2   detectron2 source tree (built in place), if not installed

and this module imports their packages under private names (their DI-MaskDINO package is also
called `dimaskdino`) and patches, at run time only, what keeps their code off a CPU:

- torchvision: the only wheel here is a CUDA build whose C library does not load beside the CPU
  torch; importing it fails while it registers fake kernels for its C ops. detectron2 and timm
  only need its Python parts (these models never call its ops), so when that import fails the two
  registration modules are replaced by empty ones and torchvision is imported again.
- MultiScaleDeformableAttention: their compiled MSDA op cannot be built without CUDA; a stand-in
  module whose op raises makes their MSDeformAttn take its own pure-PyTorch fallback (their
  try/except), which is the reference computation.
- Hard-coded `.cuda()` / `.to('cuda')` (denoising setup, criterion, DI-MaskDINO's mask-to-box):
  `cpu_only()` makes both return CPU tensors while their code runs.
- detectron2 registries: both repositories register "MaskDINO", "MaskDINOHead", ... in the same
  detectron2 registries, so each package's entries are kept aside and put in place while that
  package builds a model.

Everything here is for tests, fixtures (tests/fixtures/make_authors_fixture.py) and
benchmarks/authors_side_by_side.py; nothing in dimaskdino/ imports it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
import subprocess
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

ENV_DETECTRON2 = "DIMASKDINO_AUTHORS_DETECTRON2"


@dataclass(frozen=True)
class AuthorsCode:
    kind: str  # "dimaskdino" or "maskdino"
    env: str  # environment variable naming the checkout
    package: str  # their package directory inside the checkout
    alias: str  # the name their package is imported under here
    add_config: str  # their function adding their config keys
    config_file: str  # their R50 COCO instance-segmentation config, relative to the checkout


KINDS = {
    "dimaskdino": AuthorsCode(
        "dimaskdino", "DIMASKDINO_AUTHORS_DIMASKDINO", "dimaskdino", "authors_dimaskdino",
        "add_dimaskdino_config", "configs/dimaskdino_r50_4scale_bs16_12ep.yaml",
    ),
    "maskdino": AuthorsCode(
        "maskdino", "DIMASKDINO_AUTHORS_MASKDINO", "maskdino", "authors_maskdino",
        "add_maskdino_config", "configs/coco/instance-segmentation/maskdino_R50_bs16_50ep_3s.yaml",
    ),
}

# The engine's maskdino presets are the DI-MaskDINO R50 setting (4 levels: res3-res5 plus one
# extra, encoder FFN 2048, FEATURE_ORDER low2high, mask2box init) without DI and BATO and with 9
# decoder layers. MaskDINO's repository has no file with exactly that; its closest R50 file (3
# levels) gets these overrides, applied before the caller's.
MASKDINO_AS_ENGINE_PRESET = [
    "MODEL.SEM_SEG_HEAD.TOTAL_NUM_FEATURE_LEVELS", 4,
    "MODEL.SEM_SEG_HEAD.DIM_FEEDFORWARD", 2048,
    "MODEL.SEM_SEG_HEAD.FEATURE_ORDER", "low2high",
    "MODEL.MaskDINO.INITIALIZE_BOX_TYPE", "mask2box",
]


def checkout(kind: str) -> Path | None:
    """The checkout named by the kind's environment variable, or None when it is not set."""
    code = KINDS[kind]
    value = os.environ.get(code.env, "")
    return Path(value) if value else None


def require_checkout(kind: str) -> Path:
    root = checkout(kind)
    code = KINDS[kind]
    if root is None:
        raise RuntimeError(f"set {code.env} to a checkout of the authors' {kind} repository")
    if not (root / code.package).is_dir():
        raise RuntimeError(f"{code.env}={root}: no '{code.package}' package folder there")
    return root


def checkout_commit(kind: str) -> str:
    """git commit of the kind's checkout ("unknown" outside git)."""
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=require_checkout(kind), text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------
# Imports
# ---------------------------------------------------------------------------------------------

_TORCHVISION_REGISTRATIONS = ("torchvision._meta_registrations", "torchvision._autograd_registrations")
_notes: list[str] = []


def notes() -> list[str]:
    """What the harness patched in this process (each said once)."""
    return list(_notes)


def _note(text: str) -> None:
    if text not in _notes:
        _notes.append(text)
        warnings.warn(f"authors_harness: {text}", stacklevel=3)


def _import_torchvision_without_c_ops() -> None:
    try:
        import torchvision  # noqa: F401
        return
    except (RuntimeError, OSError, ImportError) as error:
        reason = str(error).splitlines()[0]
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    for name in _TORCHVISION_REGISTRATIONS:
        sys.modules[name] = types.ModuleType(name)
    import torchvision  # noqa: F401,F811

    _note(f"torchvision imported without its C ops ({reason})")


class _NoCompiledMSDA(types.ModuleType):
    """Stands in for their compiled `MultiScaleDeformableAttention`: every op raises, which their
    MSDeformAttn catches to run its pure-PyTorch fallback."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise RuntimeError("compiled MultiScaleDeformableAttention is not available on this CPU")

        return unavailable


def _stub_compiled_msda() -> None:
    if "MultiScaleDeformableAttention" in sys.modules:
        return
    if importlib.util.find_spec("MultiScaleDeformableAttention") is None:
        sys.modules["MultiScaleDeformableAttention"] = _NoCompiledMSDA("MultiScaleDeformableAttention")
        _note("no compiled MultiScaleDeformableAttention: their MSDeformAttn uses its pure-PyTorch fallback")


def _import_detectron2() -> None:
    root = os.environ.get(ENV_DETECTRON2, "")
    if root and root not in sys.path:
        sys.path.insert(0, root)
    try:
        import detectron2  # noqa: F401
        from detectron2 import _C  # noqa: F401  (the built extension; layers import it)
    except ImportError as error:
        raise RuntimeError(
            f"detectron2 is not importable ({error}); install it or set {ENV_DETECTRON2} to a "
            "source tree built with `python setup.py build_ext --inplace`"
        ) from error


def _registries():
    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY

    return (META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY, BACKBONE_REGISTRY)


_packages: dict[str, types.ModuleType] = {}
_registered: dict[str, list[dict]] = {}  # kind -> per registry, the entries its package added


def import_authors(kind: str) -> types.ModuleType:
    """Their package (config, modeling, maskdino submodules imported) under its private alias.

    Their package `__init__` is not run: it registers datasets and imports data mappers that the
    model does not need. Their two absolute imports (`<package>.utils...`) see their package under
    its own name while it imports; our `dimaskdino` is put back afterwards."""
    if kind in _packages:
        return _packages[kind]
    code = KINDS[kind]
    root = require_checkout(kind)
    _import_torchvision_without_c_ops()
    _import_detectron2()
    _stub_compiled_msda()

    package = types.ModuleType(code.alias)
    package.__path__ = [str(root / code.package)]
    package.__file__ = str(root / code.package / "__init__.py")
    saved = {name: module for name, module in sys.modules.items()
             if name == code.package or name.startswith(code.package + ".")}
    for name in saved:
        del sys.modules[name]
    registries = _registries()
    others = [{name: obj for name, obj in r._obj_map.items() if name in _names_of_other_kinds(kind, i)}
              for i, r in enumerate(registries)]
    for registry, entries in zip(registries, others):
        for name in entries:
            del registry._obj_map[name]
    before = [dict(r._obj_map) for r in registries]
    sys.modules[code.alias] = package
    sys.modules[code.package] = package  # their absolute `from <package>.utils import ...`
    try:
        for sub in ("utils", "config", "modeling", "maskdino"):
            module = importlib.import_module(f"{code.alias}.{sub}")
            setattr(package, sub, module)
            sys.modules.setdefault(f"{code.package}.{sub}", module)
    finally:
        for name in [n for n in sys.modules if n == code.package or n.startswith(code.package + ".")]:
            if not name.startswith(code.alias):
                del sys.modules[name]
        sys.modules.update(saved)
    added = [{name: obj for name, obj in r._obj_map.items() if name not in b} for r, b in zip(registries, before)]
    for registry, entries, other in zip(registries, added, others):
        for name in entries:
            del registry._obj_map[name]
        registry._obj_map.update(other)
    _registered[kind] = added
    _packages[kind] = package
    return package


def _names_of_other_kinds(kind: str, index: int) -> set[str]:
    return {name for other, added in _registered.items() if other != kind for name in added[index]}


@contextlib.contextmanager
def _registered_as(kind: str):
    """detectron2's registries hold `kind`'s entries (and no other kind's) inside the block."""
    registries = _registries()
    saved = [dict(r._obj_map) for r in registries]
    for registry, index in zip(registries, range(len(registries))):
        for name in _names_of_other_kinds(kind, index):
            registry._obj_map.pop(name, None)
        registry._obj_map.update(_registered[kind][index])
    try:
        yield
    finally:
        for registry, entries in zip(registries, saved):
            registry._obj_map.clear()
            registry._obj_map.update(entries)


# ---------------------------------------------------------------------------------------------
# Run-time patches
# ---------------------------------------------------------------------------------------------


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


@contextlib.contextmanager
def cpu_only():
    """Inside the block `tensor.cuda()` returns the tensor and `tensor.to('cuda')` stays on the
    CPU: their denoising setup, criterion and mask-to-box call these unconditionally."""
    real_cuda, real_to = torch.Tensor.cuda, torch.Tensor.to

    def cuda(self, *args, **kwargs):
        return self

    def to(self, *args, **kwargs):
        if args and _is_cuda(args[0]):
            args = ("cpu",) + args[1:]
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return real_to(self, *args, **kwargs)

    torch.Tensor.cuda, torch.Tensor.to = cuda, to
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.Tensor.to = real_cuda, real_to


@contextlib.contextmanager
def injected_points(kind: str, matcher_points: torch.Tensor | None, loss_points: torch.Tensor | None):
    """Their matcher samples `torch.rand(1, P, 2)` points per image and their mask loss samples
    importance points per matched mask; inside the block every matcher call uses
    `matcher_points` (P, 2) and every mask loss uses `loss_points` (P, 2) for every mask, so
    that another implementation can be given exactly the same points. None keeps theirs."""
    import_authors(kind)
    matcher_module = importlib.import_module(f"{KINDS[kind].alias}.modeling.matcher")
    criterion_module = importlib.import_module(f"{KINDS[kind].alias}.modeling.criterion")
    real_sample = matcher_module.point_sample
    real_uncertain = criterion_module.get_uncertain_point_coords_with_randomness

    def matcher_point_sample(masks, coords, **kwargs):
        coords = matcher_points.to(coords).unsqueeze(0).expand(coords.shape[0], -1, -1)
        return real_sample(masks, coords, **kwargs)

    def loss_point_coords(masks, *args, **kwargs):
        return loss_points.to(masks).unsqueeze(0).expand(masks.shape[0], -1, -1).clone()

    if matcher_points is not None:
        matcher_module.point_sample = matcher_point_sample
    if loss_points is not None:
        criterion_module.get_uncertain_point_coords_with_randomness = loss_point_coords
    try:
        yield
    finally:
        matcher_module.point_sample = real_sample
        criterion_module.get_uncertain_point_coords_with_randomness = real_uncertain


# ---------------------------------------------------------------------------------------------
# Config and model
# ---------------------------------------------------------------------------------------------


def build_cfg(kind: str, overrides: list | tuple = ()):
    """Their detectron2 config: their R50 COCO file (for MaskDINO with MASKDINO_AS_ENGINE_PRESET),
    then `overrides` (a flat key, value list as detectron2's merge_from_list), on the CPU."""
    package = import_authors(kind)
    from detectron2.config import get_cfg
    from detectron2.projects.deeplab import add_deeplab_config

    cfg = get_cfg()
    add_deeplab_config(cfg)
    getattr(package.config, KINDS[kind].add_config)(cfg)
    cfg.merge_from_file(str(require_checkout(kind) / KINDS[kind].config_file))
    if kind == "maskdino":
        cfg.merge_from_list(list(MASKDINO_AS_ENGINE_PRESET))
    cfg.merge_from_list(list(overrides))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.freeze()
    return cfg


def build_model(kind: str, cfg) -> torch.nn.Module:
    import_authors(kind)
    from detectron2.modeling import build_model as d2_build_model

    with _registered_as(kind), cpu_only():
        model = d2_build_model(cfg)
    return model.eval()


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters (their shared box heads are one module referenced several times)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def randomize_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Perturb what their init leaves symmetric, so that a swapped or mis-mapped tensor changes
    the outputs: every norm's scale, offset (and frozen BN statistics), the zero-initialized last
    box layers and biases, and the deformable sampling offsets / attention weights, which their
    init makes equal across levels."""
    from detectron2.layers import FrozenBatchNorm2d

    generator = torch.Generator().manual_seed(seed)

    def uniform(t, low, high):
        t.copy_(torch.rand(t.shape, generator=generator) * (high - low) + low)

    def normal(t, std, mean=0.0):
        t.copy_(torch.randn(t.shape, generator=generator) * std + mean)

    done = set()
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm2d)):
            uniform(module.weight, 0.5, 1.5)
            normal(module.bias, 0.2)
            done.update({id(module.weight), id(module.bias)})
        elif isinstance(module, FrozenBatchNorm2d):
            uniform(module.weight, 0.5, 1.5)
            normal(module.bias, 0.1)
            normal(module.running_mean, 0.1)
            uniform(module.running_var, 0.5, 1.5)
        elif type(module).__name__ == "MSDeformAttn":
            # Their grid init is the same for every level: add per-level noise (in pixels).
            module.sampling_offsets.bias.add_(torch.randn(module.sampling_offsets.bias.shape, generator=generator))
            normal(module.sampling_offsets.weight, 0.02)
            normal(module.attention_weights.weight, 0.05)
            normal(module.attention_weights.bias, 0.5)
            done.update({id(module.sampling_offsets.weight), id(module.sampling_offsets.bias),
                         id(module.attention_weights.weight), id(module.attention_weights.bias)})
    for name, param in model.named_parameters():
        if id(param) in done:
            continue
        flat = param.flatten()
        if bool((flat == flat[0]).all()):  # constant: zero-init last layers, zero biases
            normal(param, 0.1 if name.endswith("bias") else 0.05)
        done.add(id(param))


_GRID_MAX = 7  # weights on a 4-bit grid: value = q * 2**e, q in [-7, 7], exact in fp32


@torch.no_grad()
def snap_to_grid(model: torch.nn.Module, skip_prefixes=("criterion.",)) -> None:
    """Round every float tensor of the state dict (but `skip_prefixes`) to q * 2**e with a 4-bit
    q and one power-of-two scale per tensor, in place. The model then computes with weights that
    a fixture stores in half a byte each and that load back into fp32 bit for bit (random weights
    with 15 values per tensor are as asymmetric as any for a parity test)."""
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not tensor.is_floating_point() or name.startswith(skip_prefixes):
            continue
        tensor = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
        q, scale = to_grid(tensor)
        flat = q.view(-1)
        if flat.numel() > 1 and bool((flat == flat[0]).all()) and not bool((tensor == tensor.flatten()[0]).all()):
            # Rounding made a small tensor constant (e.g. 4 BN scales near 1): keep it asymmetric.
            flat[::2] -= 1 if int(flat[0]) > 0 else -1
        tensor.copy_(q.float() * scale)


def to_grid(tensor: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(q int8 in [-7, 7], scale 2**e) with q * scale the nearest grid value of `tensor`."""
    peak = float(tensor.abs().max()) if tensor.numel() else 0.0
    exponent = math.ceil(math.log2(peak / _GRID_MAX)) if peak > 0 else 0
    scale = 2.0 ** exponent
    return torch.round(tensor / scale).clamp(-_GRID_MAX, _GRID_MAX).to(torch.int8), scale


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    codes = (q.flatten().to(torch.int16) + 8).to(torch.uint8)  # 1..15
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    return codes[0::2] | (codes[1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor, shape) -> torch.Tensor:
    codes = torch.stack([packed & 15, packed >> 4], dim=1).flatten()
    count = math.prod(shape)
    return (codes[:count].to(torch.int16) - 8).to(torch.float32).reshape(shape)


def pack_state_dict(state_dict: dict) -> dict:
    """Flat fixture entries for a state dict: "weights/keys" (their order), per key either
    "weights/q4/<key>" (uint8, two 4-bit codes per byte) + "weights/scale/<key>" + "weights/shape/<key>"
    when the tensor is on the grid, or "weights/fp32/<key>" (e.g. criterion.empty_weight).
    Keys sharing storage (their shared box / class heads) share one stored tensor."""
    packed: dict = {"weights/keys": list(state_dict)}
    shared: dict = {}
    for key, tensor in state_dict.items():
        pointer = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if tensor.is_floating_point():
            if pointer not in shared:
                q, scale = to_grid(tensor)
                on_grid = torch.equal(q.float() * scale, tensor)
                shared[pointer] = (_pack_nibbles(q), scale) if on_grid else (tensor.clone(), None)
            stored, scale = shared[pointer]
            if scale is None:
                packed[f"weights/fp32/{key}"] = stored
            else:
                packed[f"weights/q4/{key}"] = stored
                packed[f"weights/scale/{key}"] = scale
                packed[f"weights/shape/{key}"] = list(tensor.shape)
        else:
            packed[f"weights/other/{key}"] = tensor.clone()
    return packed


def unpack_state_dict(fixture: dict) -> dict:
    """The fp32 state dict (their key names and order) stored by `pack_state_dict`."""
    state_dict = {}
    for key in fixture["weights/keys"]:
        if f"weights/q4/{key}" in fixture:
            q = _unpack_nibbles(fixture[f"weights/q4/{key}"], fixture[f"weights/shape/{key}"])
            state_dict[key] = q * fixture[f"weights/scale/{key}"]
        elif f"weights/fp32/{key}" in fixture:
            state_dict[key] = fixture[f"weights/fp32/{key}"].clone()
        else:
            state_dict[key] = fixture[f"weights/other/{key}"].clone()
    return state_dict


def write_authors_checkpoint(fixture: dict, path) -> None:
    """`{"model": state_dict}` at `path`: what their DetectionCheckpointer.save writes for this
    model (the fixture maker checks that its file holds exactly this)."""
    torch.save({"model": unpack_state_dict(fixture)}, path)


def flatten(prefix: str, value, into: dict) -> dict:
    """Nested dicts / lists / tuples of tensors and numbers -> flat "a/b/0/c" keys in `into`
    (tensors detached and cloned; a list also gets "<prefix>/#len"). Inverse: `unflatten`."""
    if isinstance(value, dict):
        for key, item in value.items():
            flatten(f"{prefix}/{key}", item, into)
    elif isinstance(value, (list, tuple)):
        into[f"{prefix}/#len"] = len(value)
        for index, item in enumerate(value):
            flatten(f"{prefix}/{index}", item, into)
    elif isinstance(value, torch.Tensor):
        into[prefix] = value.detach().clone()
    elif isinstance(value, (int, float, str, bool)) or value is None:
        into[prefix] = value
    else:
        raise TypeError(f"{prefix}: cannot store a {type(value).__name__}")
    return into


def unflatten(flat: dict, prefix: str):
    """The nested value stored by `flatten(prefix, value, flat)` (tuples come back as lists)."""
    if prefix in flat:
        return flat[prefix]
    if f"{prefix}/#len" in flat:
        return [unflatten(flat, f"{prefix}/{i}") for i in range(flat[f"{prefix}/#len"])]
    start = prefix + "/"
    names = []
    for key in flat:
        if key.startswith(start):
            name = key[len(start):].split("/", 1)[0]
            if name not in names:
                names.append(name)
    if not names:
        raise KeyError(f"fixture has no entry '{prefix}'")
    return {name: unflatten(flat, start + name) for name in names}


def criterion_inputs(fixture: dict):
    """(outputs, targets, mask_dict) of their criterion, rebuilt from a fixture."""
    mask_dict = unflatten(fixture, "train/mask_dict")
    mask_dict["known_lbs_bboxes"] = tuple(mask_dict["known_lbs_bboxes"])
    return unflatten(fixture, "train/outputs"), unflatten(fixture, "train/criterion_targets"), mask_dict


# ---------------------------------------------------------------------------------------------
# Forward with every output recorded
# ---------------------------------------------------------------------------------------------


def batched_inputs(images: list[torch.Tensor], targets: list[dict] | None = None) -> list[dict]:
    """Their model's input: uint8 (3, H, W) RGB images; targets (optional) with "labels" (N,),
    "boxes_xyxy" (N, 4) in pixels and "masks" (N, H, W) bool, as their LSJ mapper produces."""
    from detectron2.structures import Boxes, Instances

    inputs = []
    for index, image in enumerate(images):
        item = {"image": image, "height": image.shape[1], "width": image.shape[2]}
        if targets is not None:
            instances = Instances(tuple(image.shape[1:]))
            instances.gt_classes = targets[index]["labels"].long()
            instances.gt_boxes = Boxes(targets[index]["boxes_xyxy"].float())
            instances.gt_masks = targets[index]["masks"].bool()
            item["instances"] = instances
        inputs.append(item)
    return inputs


@contextlib.contextmanager
def _recording(model):
    """Records the normalized padded input, backbone features, pixel-decoder outputs, the head's
    output dict and every call of the predictor's prediction heads (masks always computed: in
    eval mode their decoder skips the masks of all but the last layer; computing them changes
    nothing else)."""
    record = {"heads": []}
    head = model.sem_seg_head
    predictor = head.predictor
    real_heads = predictor.forward_prediction_heads
    real_features = head.pixel_decoder.forward_features

    def heads(output, mask_features, pred_mask=True):
        logits, masks = real_heads(output, mask_features, True)
        record["heads"].append((logits, masks))
        return logits, masks if pred_mask else None

    def features(*args, **kwargs):
        result = real_features(*args, **kwargs)
        record["pixel_decoder"] = result
        return result

    hooks = [
        model.backbone.register_forward_pre_hook(lambda m, args: record.__setitem__("images", args[0])),
        model.backbone.register_forward_hook(lambda m, args, out: record.__setitem__("backbone", out)),
        head.register_forward_hook(lambda m, args, out: record.__setitem__("head", out)),
    ]
    predictor.forward_prediction_heads = heads
    head.pixel_decoder.forward_features = features
    try:
        yield record
    finally:
        for hook in hooks:
            hook.remove()
        del predictor.forward_prediction_heads
        del head.pixel_decoder.forward_features


def _num_ti_layers(model) -> int:
    return int(getattr(model.sem_seg_head.predictor, "ti_layers", 0) or 0) if hasattr(
        model.sem_seg_head.predictor, "oldm") else 0


@torch.no_grad()
def eval_forward(model, images: list[torch.Tensor]) -> dict:
    """Their eval forward on uint8 images; returns a flat dict of tensors (see
    tests/fixtures/authors/FORMAT.md for the keys)."""
    model.eval()
    with cpu_only(), _recording(model) as record:
        results = model(batched_inputs(images))
    out, _ = record["head"]
    flat = {"input/normalized_padded": record["images"]}
    for name, value in record["backbone"].items():
        flat[f"backbone/{name}"] = value
    mask_features, encoder_features, multi_scale = record["pixel_decoder"]
    flat["pixel_decoder/mask_features"] = mask_features
    for index, value in enumerate(multi_scale):
        flat[f"pixel_decoder/multi_scale/{index}"] = value

    heads = record["heads"]
    num_ti = _num_ti_layers(model)
    num_layers = len(out["aux_outputs"])  # initial prediction + decoder layers but the last
    expected = 1 + num_ti + 1 + num_layers
    if len(heads) != expected:
        raise RuntimeError(f"recorded {len(heads)} prediction-head calls, expected {expected}")
    interm = out["interm_outputs"]
    flat["interm/logits"] = interm["pred_logits"]
    flat["interm/boxes"] = interm["pred_boxes"]
    flat["interm/masks"] = interm["pred_masks"]
    for i, ti in enumerate(out.get("oldm_outputs", [])):
        flat[f"ti/{i}/logits"] = ti["pred_logits"]
        flat[f"ti/{i}/boxes"] = ti["pred_boxes"]
    # aux_outputs[0] is the initial prediction, aux_outputs[i] decoder layer i-1; the main
    # outputs are the last decoder layer.
    stages = list(out["aux_outputs"]) + [out]
    head_calls = heads[1 + num_ti:]
    for index, (stage, (logits, masks)) in enumerate(zip(stages, head_calls)):
        prefix = "initial" if index == 0 else f"layer/{index - 1}"
        if not torch.equal(logits, stage["pred_logits"]):
            raise RuntimeError(f"{prefix}: recorded logits differ from the output dict")
        flat[f"{prefix}/logits"] = stage["pred_logits"]
        flat[f"{prefix}/boxes"] = stage["pred_boxes"]
        flat[f"{prefix}/masks"] = masks
    for b, result in enumerate(results):
        instances = result["instances"]
        flat[f"instances/{b}/scores"] = instances.scores
        flat[f"instances/{b}/labels"] = instances.pred_classes
        flat[f"instances/{b}/boxes_xyxy"] = instances.pred_boxes.tensor
        flat[f"instances/{b}/masks"] = instances.pred_masks.bool()
    return {k: v.detach().clone() for k, v in flat.items()}


def train_forward(model, images, targets, matcher_points=None, loss_points=None, kind: str = "dimaskdino"):
    """Their training forward (denoising included) with the criterion's points injected.

    Returns (losses, record): `losses` their criterion's terms before weighting (dict name ->
    0-d tensor, autograd graph kept), and `record` with "criterion_inputs" = (outputs, targets,
    mask_dict) exactly as their criterion received them, and "weight_dict"."""
    model.train()
    criterion = model.criterion
    record = {}
    real_forward = criterion.forward

    def forward(outputs, targets_, mask_dict=None):
        record["criterion_inputs"] = (outputs, targets_, mask_dict)
        losses = real_forward(outputs, targets_, mask_dict)
        # Their model then multiplies these tensors by the weights in place: keep copies.
        record["losses"] = {name: value.clone() for name, value in losses.items()}
        return losses

    criterion.forward = forward
    try:
        with cpu_only(), injected_points(kind, matcher_points, loss_points):
            weighted = model(batched_inputs(images, targets))
    finally:
        del criterion.forward
    record["weighted"] = weighted
    record["weight_dict"] = dict(criterion.weight_dict)
    return record["losses"], record


def run_criterion(model, outputs, targets, mask_dict, matcher_points, loss_points, kind: str = "dimaskdino"):
    """Their criterion on given outputs/targets with the points injected: dict of loss terms."""
    with cpu_only(), injected_points(kind, matcher_points, loss_points):
        return dict(model.criterion(outputs, targets, mask_dict))
