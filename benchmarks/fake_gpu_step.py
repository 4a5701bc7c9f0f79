"""A full training step of a COCO-scale preset on fake CUDA tensors: every GPU-only Python line
runs on a machine without a GPU, and the step reports what can be learnt without one.

    python benchmarks/fake_gpu_step.py [--preset dimaskdino_r50_12ep] [--size 1024] [--batch 2]
                                       [--runs base,all] [--out DIR]

Needs a CUDA build of torch (it loads the CUDA libraries without a GPU; a CPU build cannot make
CUDA tensors even fake ones) and the dimaskdino extension built for it (so that the CUDA kernel of
ms_deform_attn is registered). Under `torch._subclasses.fake_tensor.FakeTensorMode` every tensor
is a `device="cuda"` FakeTensor: shapes, dtypes and strides are computed, nothing is allocated
or launched. The script emulates an H200's device queries (`emulate_h200`: is_available,
capability (9, 0), 132 SMs), so `impl=auto` takes the CUDA / Triton branch of every op (through
its fake kernel), `train_masks=auto` the point-sampled mask path and autocast bf16 is on.

One step = `dimaskdino.train.step_losses` (forward of both views, every loss) and backward. Not
run: the optimizer step (AdamW reads its step counter on the host) and the data loader.

Reported per run (JSON via benchmarks/provenance.write_result, `fake-gpu-step.json`):
- `kernels`: every dimaskdino op call with its inputs' shapes, dtypes and strides, and for the
  Triton ops every kernel launch the real op body would make (kernel, grid, argument dtypes,
  integer values, constexprs, num_warps, num_stages): the specializations the Triton kernels are
  compiled for on the GPU;
- `memory`: bytes of the distinct storages autograd saved for backward (saved-tensor hooks;
  parameters counted apart), per image, and a peak estimate per image = saved activations per
  image + (parameters + gradients + AdamW's two moments, fp32) / batch. Not counted: transient
  workspace (the largest temporaries of one op), the allocator's fragmentation, the CUDA context;
- `gpu_branches`: every `if` whose test reads `is_cuda` or compares a device type with "cuda" in
  the modules the step reaches, and whether its CUDA side ran (a line tracer).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import json
import os
import sys
import threading
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # benchmarks.* when run as a script (an installed dimaskdino comes first)

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from benchmarks.provenance import write_result  # noqa: E402
from benchmarks.synthetic_batch import synthetic_batch  # noqa: E402

RUNS = {
    "base": [],
    # Every SPEC section 6 switch at once (hybrid mask supervision is experimental, and included).
    "all": ["train.hybrid_heads=atss,rcnn", "train.hybrid_masks=true", "train.inter_scene=true", "train.equivariance=true"],
}
MEMORY_TARGET_BYTES_PER_IMAGE = 2.5e9
H200 = types.SimpleNamespace(name="NVIDIA H200 (emulated for FakeTensorMode)", major=9, minor=0,
                             multi_processor_count=132, total_memory=143_771_000_832)
# Modules whose GPU-only branches a training step must run; the rest (data, dist, train's loop)
# belong to the loader, process group and trainer setup, which the step does not include.
STEP_MODULES = ("ops", "model", "training_methods.py")


# ---------------------------------------------------------------------------------------------
# An H200 for the Python side


@contextlib.contextmanager
def emulate_h200():
    """torch.cuda's device queries answer like one H200; CUDA generators become CPU generators
    (a torch.Generator on CUDA needs a driver; the trainer's seeding code still runs, with the same
    seeds). Everything is restored on exit."""
    import dimaskdino.train as trainer

    patches = {
        (torch.cuda, "is_available"): lambda: True,
        (torch.cuda, "device_count"): lambda: 1,
        (torch.cuda, "current_device"): lambda: 0,
        (torch.cuda, "get_device_capability"): lambda device=None: (H200.major, H200.minor),
        (torch.cuda, "get_device_properties"): lambda device=None: H200,
        (torch.cuda, "get_device_name"): lambda device=None: H200.name,
        (torch.cuda, "is_bf16_supported"): lambda *args, **kwargs: True,
    }
    real_generators = trainer.batch_generators

    def cpu_generators(seed, step, image_ids, device, view=0):
        return real_generators(seed, step, image_ids, torch.device("cpu"), view)

    patches[(trainer, "batch_generators")] = cpu_generators
    saved = {key: getattr(*key) for key in patches}
    try:
        for (owner, name), value in patches.items():
            setattr(owner, name, value)
        for module in _modules_with_sm_cache():
            module._multiprocessors.cache_clear()
        yield
    finally:
        for (owner, name), value in saved.items():
            setattr(owner, name, value)
        for module in _modules_with_sm_cache():
            module._multiprocessors.cache_clear()


def _triton_op_modules() -> list[types.ModuleType]:
    # By path: dimaskdino.ops re-exports functions under the modules' names.
    return [importlib.import_module(f"dimaskdino.ops.{name}") for name in ("bato_attention", "mask_loss", "topk_select")]


def _modules_with_sm_cache():
    return [m for m in _triton_op_modules() if hasattr(m, "_multiprocessors")]


class DeviceFreeFakeTensorMode(FakeTensorMode):
    """FakeTensorMode that never touches a CUDA device, even while torch.cuda.is_available() is
    emulated as True (the stock mode would then materialize tensors on the device)."""

    @property
    def avoid_device_init(self) -> bool:
        return True


class FixedDataDependentAnswers(TorchDispatchMode):
    """Fixed answers where a shape or a Python value depends on tensor values, which fake tensors
    do not have (the hybrid heads' anchor assignment, sampling, NMS and RoI level split; the step
    without them has none). Only shapes follow from these answers; every use is counted in the
    report. A boolean selection (nonzero, x[mask], masked_select) keeps min(n, FIXED_SELECTED)
    elements, except that of several masks compared from the same tensor (`levels == level` for
    each level, `assigned >= 0` and `assigned == -1`) only the first selects anything: such masks
    partition their tensor, and code relies on the parts adding up. bincount has `minlength`
    bins, torch.equal is True (an iteration to a fixed point stops after one pass), a scalar read
    (.item(), bool(t), int(t)) gives True / FIXED_SELECTED / 1.0."""

    FIXED_SELECTED = 1024  # at least the 2 x 512 sampled RoIs, so that their level split adds up
    COMPARISONS = ("eq", "ne", "ge", "gt", "le", "lt")

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}
        self.compared_from: dict[StorageWeakRef, StorageWeakRef] = {}  # mask storage -> compared tensor's
        self.selected_sources: set[StorageWeakRef] = set()
        self.keep = []

    def _count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    def _nonzero(self, mask: torch.Tensor) -> torch.Tensor:
        source = self.compared_from.get(StorageWeakRef(mask.untyped_storage()))
        kept = min(mask.numel(), self.FIXED_SELECTED)
        if source is not None:
            if source in self.selected_sources:
                kept = 0
            self.selected_sources.add(source)
        return torch.zeros((kept, mask.dim()), dtype=torch.int64, device=mask.device)

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func.namespace == "aten" and func._opname in self.COMPARISONS and isinstance(args[0], torch.Tensor):
            out = func(*args, **kwargs)
            self.compared_from[StorageWeakRef(out.untyped_storage())] = StorageWeakRef(args[0].untyped_storage())
            self.keep += [out, args[0]]  # storage ids stay unique while recorded
            return out
        if func is aten.nonzero.default:
            self._count("nonzero")
            return self._nonzero(args[0])
        if func is aten.masked_select.default:
            self._count("masked_select")
            source, mask = torch.broadcast_tensors(args[0], args[1])
            return source.reshape(-1)[: min(mask.numel(), self.FIXED_SELECTED)].clone()
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._unsafe_index_put.default):
            indices = args[1]
            if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
                self._count(f"{func.__name__} with a boolean mask")
                expanded = []
                for index in indices:
                    if index is not None and index.dtype in (torch.bool, torch.uint8):
                        expanded.extend(self._nonzero(index).unbind(1))
                    else:
                        expanded.append(index)
                return func(args[0], expanded, *args[2:], **kwargs)
        if func is aten.bincount.default:
            self._count("bincount")
            weights = args[1] if len(args) > 1 else kwargs.get("weights")
            minlength = args[2] if len(args) > 2 else kwargs.get("minlength", 0)
            dtype = torch.float64 if weights is not None else torch.int64
            return torch.zeros((max(int(minlength), 1),), dtype=dtype, device=args[0].device)
        if func is aten.equal.default:
            self._count("equal")
            return True
        if func is aten._local_scalar_dense.default:
            self._count("scalar read")
            if args[0].dtype == torch.bool:
                return True
            return 1.0 if args[0].is_floating_point() else self.FIXED_SELECTED
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# What reaches the kernels


def describe(value):
    if isinstance(value, torch.Tensor):
        return {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch."),
                "stride": list(value.stride()), "device": value.device.type}
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return repr(value)


def _triton_arg(value):
    """A launch argument as Triton specializes it: pointer dtype, or an integer with its value."""
    if isinstance(value, torch.Tensor):
        return "*" + str(value.dtype).removeprefix("torch.")
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return {"int": value, "divisible_by_16": value % 16 == 0, "is_one": value == 1}
    if isinstance(value, float):
        return "fp32"
    return repr(value)


class _LaunchRecorder:
    """Stands in for torch.library.wrap_triton inside the op modules: records kernel[grid](...)
    instead of launching (the op body runs on fake tensors)."""

    def __init__(self):
        self.launches: list[dict] = []

    def __call__(self, kernel):
        recorder = self

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    names = list(getattr(kernel, "arg_names", []))
                    recorder.launches.append({
                        "kernel": getattr(kernel, "__name__", None) or kernel.fn.__name__,
                        "grid": [int(g) for g in grid],
                        "args": {names[i] if i < len(names) else str(i): _triton_arg(a) for i, a in enumerate(args)},
                        "constexprs": {k: v if isinstance(v, (bool, int, float, str)) else repr(v) for k, v in kwargs.items()},
                    })
                return launch

        return Launcher()


def _triton_op_bodies() -> dict[str, tuple[types.ModuleType, object]]:
    """op name -> (module, the function under triton_op) for every Triton op of the project."""
    from torch._library.custom_ops import CustomOpDef

    bodies = {}
    for module in _triton_op_modules():
        for value in vars(module).values():
            if isinstance(value, CustomOpDef):
                bodies[value._name] = (module, value._init_fn)
    return bodies


class KernelRecorder(TorchDispatchMode):
    """Records every dimaskdino op call (once per distinct signature, with a count), and replays
    each distinct Triton op call through its real body with the launches recorded."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, dict] = {}
        self.bodies = _triton_op_bodies()

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "dimaskdino":
            name = func._schema.name.removeprefix("dimaskdino::")
            inputs = describe(list(args))
            key = json.dumps([name, inputs], sort_keys=True)
            if key in self.calls:
                self.calls[key]["count"] += 1
            else:
                self.calls[key] = {"op": name, "inputs": inputs, "count": 1, "launches": self._launches(name, args, kwargs)}
        return func(*args, **kwargs)

    def _launches(self, name, args, kwargs):
        if name not in self.bodies:
            return None  # a C++ op (its CUDA kernel's template instance follows from the dtypes)
        module, body = self.bodies[name]
        recorder = _LaunchRecorder()
        real = module.wrap_triton
        module.wrap_triton = recorder
        try:
            with torch.no_grad():
                body(*args, **kwargs)
        finally:
            module.wrap_triton = real
        return recorder.launches

    def report(self) -> list[dict]:
        return sorted(self.calls.values(), key=lambda c: c["op"])


# ---------------------------------------------------------------------------------------------
# Backward without the autograd engine


def walk_backward(loss: torch.Tensor) -> int:
    """loss.backward(), done by calling every node of the autograd graph from Python in
    dependency order; returns the number of nodes run.

    Why: since torch 2.11 the engine asks the CUDA driver whether a device has a primary context
    for every CUDA tensor in the graph, which fails without a driver even for fake tensors. The
    nodes themselves (each op's derivative formula, the project's registered backward ops and
    autograd.Functions, AccumulateGrad) are the same; what the engine adds and this does too:
    gradients summed per input, reduced to the input's shape and cast to its dtype
    (validate_outputs), and grad mode off while the nodes run (no graph of the backward, nothing
    saved by it). Not reproduced: tensor hooks (the model registers none), streams, threads.
    """
    with torch.no_grad():
        return _walk_backward(loss)


def _walk_backward(loss: torch.Tensor) -> int:
    root = loss.grad_fn
    pending: dict = {}  # node -> how many edges into it are still to run
    stack, seen = [root], {root}
    while stack:
        node = stack.pop()
        for successor, _ in node.next_functions:
            if successor is None:
                continue
            pending[successor] = pending.get(successor, 0) + 1
            if successor not in seen:
                seen.add(successor)
                stack.append(successor)
    grads = {root: {0: torch.ones_like(loss)}}
    ready, count = [root], 0
    while ready:
        node = ready.pop()
        incoming = grads.pop(node, {})
        outputs = ()
        if incoming:  # a node that gets no gradient passes none on (the engine would pass zeros)
            outputs = _run_node(node, incoming)
            count += 1
        for index, (successor, slot) in enumerate(node.next_functions):
            if successor is None:
                continue
            grad = outputs[index] if index < len(outputs) else None
            if grad is not None:
                meta = successor._input_metadata[slot]
                if tuple(grad.shape) != tuple(meta.shape):
                    grad = grad.sum_to_size(meta.shape)
                if grad.dtype != meta.dtype:
                    grad = grad.to(meta.dtype)
                into = grads.setdefault(successor, {})
                into[slot] = grad if slot not in into else into[slot] + grad
            pending[successor] -= 1
            if pending[successor] == 0:
                ready.append(successor)
    return count


def _run_node(node, incoming: dict) -> tuple:
    metadata = node._input_metadata
    grads = [incoming.get(i) for i in range(max(len(metadata), max(incoming) + 1))]
    if not hasattr(node, "_forward_cls"):  # a C++ node: callable, takes undefined (None) gradients
        outputs = node(*grads)
        return outputs if isinstance(outputs, tuple) else (outputs,)
    # A Python autograd.Function (the project's ops, via register_autograd): as the engine does,
    # missing gradients become zeros and the values returned for non-tensor arguments (None,
    # after the tensors in every Function of the project) are dropped.
    grads = [g if g is not None else torch.zeros(m.shape, dtype=m.dtype, device=m.device) for g, m in zip(grads, metadata)]
    outputs = node.apply(*grads)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    edges = len(node.next_functions)
    if len(outputs) > edges:
        if any(extra is not None for extra in outputs[edges:]):
            raise RuntimeError(f"walk_backward: {node.name()}: gradients for non-tensor arguments, or tensor "
                               "arguments after non-tensor ones (not supported)")
        outputs = outputs[:edges]
    return outputs


# ---------------------------------------------------------------------------------------------
# Saved activations


def _project_caller() -> str:
    """module:function:line of the innermost project frame (where the saving op was called)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        # The CUDA torch venv lives under ~/.cache/dimaskdino/, so torch's own files also contain
        # "/dimaskdino/": installed packages are never the project.
        if "/dimaskdino/" in name and "/benchmarks/" not in name and "/site-packages/" not in name:
            return f"{name[name.rindex('/dimaskdino/') + 1:]}:{frame.f_code.co_name}:{frame.f_lineno}"
        frame = frame.f_back
    return "outside the project (backward formulas)"


class SavedTensors:
    """Distinct storages saved for backward (parameter storages apart), summed in bytes."""

    def __init__(self, parameters):
        self.parameter_storages = {StorageWeakRef(p.untyped_storage()) for p in parameters}
        self.storages: dict[StorageWeakRef, int] = {}
        self.by_dtype: dict[str, int] = {}
        self.by_site: dict[str, int] = {}
        self.keep = []  # storages stay alive (and their ids unique) until the report

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        ref = StorageWeakRef(storage)
        if ref not in self.parameter_storages and ref not in self.storages:
            self.storages[ref] = storage.nbytes()
            dtype = str(tensor.dtype).removeprefix("torch.")
            self.by_dtype[dtype] = self.by_dtype.get(dtype, 0) + storage.nbytes()
            site = _project_caller()
            self.by_site[site] = self.by_site.get(site, 0) + storage.nbytes()
            self.keep.append(storage)
        return tensor

    @staticmethod
    def unpack(tensor):
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def total(self) -> int:
        return sum(self.storages.values())


# ---------------------------------------------------------------------------------------------
# GPU-only branches and the lines that ran


class LineTracer:
    """(file, line) of every line executed in the project's package, in every thread (backward
    runs in autograd's device threads)."""

    def __init__(self, package_dir: Path):
        self.prefix = str(package_dir)
        self.lines: set[tuple[str, int]] = set()

    def _local(self, frame, event, arg):
        if event == "line":
            self.lines.add((frame.f_code.co_filename, frame.f_lineno))
        return self._local

    def _global(self, frame, event, arg):
        if frame.f_code.co_filename.startswith(self.prefix):
            self.lines.add((frame.f_code.co_filename, frame.f_lineno))
            return self._local
        return None

    @contextlib.contextmanager
    def active(self):
        threading.settrace(self._global)
        sys.settrace(self._global)
        try:
            yield
        finally:
            sys.settrace(None)
            threading.settrace(None)


def _cuda_test(test: ast.expr) -> str | None:
    """"cuda" when the CUDA side of `if test:` is its body, "other" when it is its else side (or
    what follows), None when the test reads no device."""
    source = ast.unparse(test)
    if "is_cuda" not in source and "'cuda'" not in source:
        return None
    negated = ("!= 'cuda'" in source or source.startswith("not ")) and "== 'cuda'" not in source
    return "other" if negated else "cuda"


def _python_files(path: Path) -> list[Path]:
    if not path.is_dir():
        return [path]
    return sorted(Path(folder) / name for folder, _, names in os.walk(path, followlinks=True)
                  for name in names if name.endswith(".py"))


def gpu_branches(package_dir: Path, modules: tuple[str, ...]) -> list[dict]:
    """Every `if` on a CUDA test in `modules` (paths under the imported package) and the first
    line of its CUDA side."""
    found = []
    for relative in modules:
        for file in _python_files(package_dir / relative):
            tree = ast.parse(file.read_text())
            for parent in ast.walk(tree):
                for field in ("body", "orelse"):
                    statements = getattr(parent, field, None)
                    if not isinstance(statements, list):
                        continue
                    for index, node in enumerate(statements):
                        if not isinstance(node, ast.If):
                            continue
                        side = _cuda_test(node.test)
                        if side is None:
                            continue
                        if side == "cuda":
                            target = node.body[0]
                        elif node.orelse:
                            target = node.orelse[0]
                        elif index + 1 < len(statements):
                            target = statements[index + 1]
                        else:
                            continue  # nothing follows: the CUDA side is the caller's
                        found.append({"file": "dimaskdino/" + str(file.relative_to(package_dir)), "line": node.lineno,
                                      "test": ast.unparse(node.test), "cuda_side_line": target.lineno,
                                      "path": str(file)})
    return found


# ---------------------------------------------------------------------------------------------
# The step


def run_step(preset: str, size: int, batch_size: int, overrides: list[str], tracer: LineTracer) -> dict:
    from dimaskdino.config import apply_overrides, get_preset
    from dimaskdino.model import build_model
    from dimaskdino.model.criterion import build_criterion
    from dimaskdino.train import step_losses
    from dimaskdino.training_methods import InterSceneTerm

    cfg = apply_overrides(get_preset(preset), ["impl=auto", "model.train_masks=auto", f"data.image_size={size}",
                                               f"train.batch_size={batch_size}", *overrides])
    batch = synthetic_batch(batch_size, size, cfg.model.num_classes, instances=8, seed=0,
                            second_view=cfg.train.equivariance)
    device = torch.device("cuda")
    started = time.perf_counter()
    with emulate_h200(), DeviceFreeFakeTensorMode(allow_non_fake_inputs=True):
        torch.manual_seed(0)
        with device:  # parameters made on the (fake) GPU: Module.to cannot swap fake parameters
            model = build_model(cfg).train()
        criterion = build_criterion(cfg)
        inter_scene = InterSceneTerm.from_config(cfg, device) if cfg.train.inter_scene else None
        parameters = list(model.parameters())
        saved = SavedTensors(parameters)
        kernels = KernelRecorder()
        fixed = FixedDataDependentAnswers()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
        with tracer.active(), fixed, kernels, saved.hooks():
            losses = step_losses(model, criterion, cfg, batch, 0, device, autocast, inter_scene)
            total = sum(losses.values())
            backward_nodes = walk_backward(total)
        missing_grads = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
        loss_dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in losses.values()})
        all_cuda = all(v.device.type == "cuda" for v in losses.values())
    seconds = time.perf_counter() - started
    parameter_count = sum(p.numel() for p in parameters)
    activation_bytes = saved.total()
    # fp32 parameters + gradients + AdamW exp_avg + exp_avg_sq, shared by the images of a GPU's batch.
    state_bytes = 16 * parameter_count
    per_image = activation_bytes / batch_size + state_bytes / batch_size
    return {
        "overrides": overrides,
        "preset": preset, "image_size": size, "batch_size": batch_size, "autocast": "bfloat16", "impl": "auto",
        "train_masks": "auto -> points" if model.uses_point_masks(device) else "auto -> full",
        "fake_step_seconds": round(seconds, 2),
        "backward_nodes_run": backward_nodes,
        "fixed_data_dependent_answers": fixed.counts,
        "loss_terms": len(losses), "loss_keys": sorted(losses), "loss_dtypes": loss_dtypes, "losses_on_cuda": all_cuda,
        "parameters_without_grad": missing_grads,
        "kernels": kernels.report(),
        "memory": {
            "saved_activation_bytes": activation_bytes,
            "saved_activation_bytes_per_image": activation_bytes / batch_size,
            "saved_bytes_by_dtype": saved.by_dtype,
            "saved_storages": len(saved.storages),
            "largest_saving_sites": dict(sorted(saved.by_site.items(), key=lambda kv: -kv[1])[:20]),
            "parameters": parameter_count,
            "parameter_gradient_adamw_bytes": state_bytes,
            "peak_estimate_bytes_per_image": per_image,
            "target_bytes_per_image": MEMORY_TARGET_BYTES_PER_IMAGE,
            "within_target": per_image <= MEMORY_TARGET_BYTES_PER_IMAGE,
            "not_counted": "transient workspace of single ops, allocator fragmentation, CUDA context",
        },
    }


def package_dir() -> Path:
    """The dimaskdino package as imported (an editable install, or a copy built elsewhere)."""
    import dimaskdino

    return Path(dimaskdino.__file__).parent


def branch_report(tracer: LineTracer) -> list[dict]:
    rows = []
    for branch in gpu_branches(package_dir(), STEP_MODULES):
        ran = (branch.pop("path"), branch["cuda_side_line"]) in tracer.lines
        rows.append({**branch, "cuda_side_ran": ran})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="dimaskdino_r50_12ep")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--runs", default="base,all", help=f"comma-separated, from {list(RUNS)}")
    parser.add_argument("--out", default=None, help="folder for fake-gpu-step.json (default: print only)")
    args = parser.parse_args(argv)
    if torch.version.cuda is None:
        print(f"fake_gpu_step: needs a CUDA build of torch (this is {torch.__version__}, CPU only): FakeTensorMode "
              "cannot make CUDA tensors on a CPU build", file=sys.stderr)
        return 2
    from dimaskdino import _extension

    if not _extension.native_available("dimaskdino::ms_deform_attn", "cuda"):
        print(f"fake_gpu_step: the extension has no CUDA kernels: {_extension.why_unavailable('cuda')}", file=sys.stderr)
        return 2
    tracer = LineTracer(package_dir())
    runs = {}
    for name in args.runs.split(","):
        runs[name] = run_step(args.preset, args.size, args.batch, RUNS[name], tracer)
        memory = runs[name]["memory"]
        print(f"{name}: {runs[name]['loss_terms']} loss terms, {len(runs[name]['kernels'])} distinct op calls, "
              f"saved activations {memory['saved_activation_bytes_per_image'] / 2**30:.2f} GiB/img, "
              f"peak estimate {memory['peak_estimate_bytes_per_image'] / 1e9:.2f} GB/img "
              f"({runs[name]['fake_step_seconds']} s)", flush=True)
    branches = branch_report(tracer)
    missed = [b for b in branches if not b["cuda_side_ran"]]
    for branch in missed:
        print(f"CUDA side not run: {branch['file']}:{branch['line']} if {branch['test']}", flush=True)
    payload = {"runs": runs, "gpu_branches": branches, "gpu_branches_missed": len(missed),
               "note": "FakeTensorMode on a CUDA build of torch without a GPU; device queries emulate an H200"}
    if args.out:
        path = write_result(args.out, "fake-gpu-step.json", payload)
        print(f"written {path}")
    else:
        print(json.dumps({"gpu_branches_missed": len(missed)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
