"""A CUDA build of torch beside the test environment, with the project's extension built for it.

The suite itself runs on whatever torch is installed (on the CPU machine: a CPU build). Tests that
must see the CUDA side of the project (the CUDA extension linked and its kernels registered, code
that runs only under a CUDA torch) run in a subprocess with the interpreter and environment that
`cuda_torch_env()` returns:

    python, env = cuda_torch_env()
    subprocess.run([python, "-c", code], env=env, cwd=ROOT, check=True)

What it costs, once per machine (everything is cached under $DIMASKDINO_CACHE or ~/.cache/dimaskdino,
in cuda-torch/):
- a venv with a CUDA build of torch (default `torch==2.14.1 torchvision==0.29.1`, the newest
  release; PyPI's Linux wheels are CUDA builds and load without a GPU): about 5.5 GB on disk and,
  where pip finds the wheels on local disk, about a minute (from PyPI: a ~900 MB torch wheel plus
  ~3 GB of nvidia-* wheels). $DIMASKDINO_CUDA_PYTHON names an existing interpreter instead.
- the extension built with FORCE_CUDA=1 for sm_90a (the torch glue and every .cu, compiled with the
  machine's nvcc and linked): about 1-3 minutes on 2 cores, rebuilt only when csrc/, setup.py, the
  torch version or nvcc change (the cache key).

The build goes to its own folder, never to the in-tree dimaskdino/_C*.so (that one belongs to the
installed torch). The child imports `dimaskdino` from a package folder of symlinks to this checkout
with the CUDA-built _C beside them; PYTHONSAFEPATH=1 keeps the current directory (the repo root,
whose dimaskdino/ holds the other _C) off sys.path. TRITON_INTERPRET is removed from the child's
environment (conftest sets it for the CPU tests); add it back where a test wants it.

Failures raise CudaTorchUnavailable; `cuda_torch_or_skip()` turns that into a skip, or into a
failure under CI (CI=true), where this must work.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REQUIREMENTS = ("torch==2.14.1", "torchvision==0.29.1")
# What setup.py build_ext and the project's runtime need besides torch.
BUILD_REQUIREMENTS = ("numpy", "scipy", "setuptools>=64", "wheel", "ninja", "pybind11")
CUDA_ARCHS = "90a"


class CudaTorchUnavailable(RuntimeError):
    """The CUDA torch environment (or a package for it) could not be made; says why."""


def cache_root(kind: str = "cuda-torch") -> Path:
    base = os.environ.get("DIMASKDINO_CACHE") or Path.home() / ".cache" / "dimaskdino"
    return Path(base).expanduser() / kind


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@contextmanager
def _locked(path: Path):
    """Serializes venv creation and builds between processes (pytest-xdist workers, helpers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(command: list[str], log: Path, what: str, **kwargs) -> None:
    with open(log, "a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, **kwargs)
    if result.returncode != 0:
        tail = log.read_text()[-4000:]
        raise CudaTorchUnavailable(f"{what} failed (exit {result.returncode}, log {log}):\n{tail}")


def _requirements() -> tuple[str, ...]:
    spec = os.environ.get("DIMASKDINO_CUDA_TORCH_REQUIREMENTS")
    return tuple(spec.split()) if spec else DEFAULT_REQUIREMENTS


def cuda_python() -> str:
    """An interpreter whose torch is a CUDA build: $DIMASKDINO_CUDA_PYTHON, else a cached venv
    (created on first use)."""
    given = os.environ.get("DIMASKDINO_CUDA_PYTHON")
    if given:
        if not Path(given).exists():
            raise CudaTorchUnavailable(f"DIMASKDINO_CUDA_PYTHON={given} does not exist")
        return given
    requirements = _requirements()
    key = hashlib.sha256(" ".join(requirements + BUILD_REQUIREMENTS).encode()).hexdigest()[:12]
    venv = cache_root() / f"venv-{key}"
    python = venv / "bin" / "python"
    done = venv / ".complete"
    with _locked(cache_root() / f"venv-{key}.lock"):
        if not done.exists():
            shutil.rmtree(venv, ignore_errors=True)  # a half-made venv from an interrupted run
            venv.parent.mkdir(parents=True, exist_ok=True)
            log = cache_root() / f"venv-{key}.log"
            log.write_text("")
            _run([sys.executable, "-m", "venv", str(venv)], log, "creating the CUDA torch venv")
            _run(
                [str(python), "-m", "pip", "install", "--disable-pip-version-check", *requirements, *BUILD_REQUIREMENTS],
                log, f"pip install {' '.join(requirements)} into {venv}",
            )
            done.write_text(" ".join(requirements) + "\n")
    return str(python)


def pip_target(requirement: str) -> Path:
    """A folder holding `requirement` (no dependencies), installed once with
    `pip install --target` for this interpreter: for a package version to be put first on
    PYTHONPATH in a subprocess (e.g. triton==3.6.0 beside the installed triton)."""
    folder = cache_root("packages") / f"{requirement}-{sys.implementation.cache_tag}"
    done = folder / ".complete"
    with _locked(folder.with_name(folder.name + ".lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            log = folder.with_name(folder.name + ".log")
            log.write_text("")
            _run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps", "--target", str(folder), requirement],
                 log, f"pip install --target {folder} {requirement}")
            done.write_text(requirement + "\n")
    return folder


def _probe(python: str, code: str) -> str:
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, env=_child_env_base())
    if result.returncode != 0:
        raise CudaTorchUnavailable(f"{python} -c {code!r} failed:\n{result.stderr[-2000:]}")
    return result.stdout.strip()


def _child_env_base() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.pop("PYTHONPATH", None)
    env["PYTHONSAFEPATH"] = "1"
    return env


def _nvcc_version() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise CudaTorchUnavailable("nvcc is not on PATH: the CUDA kernels cannot be built")
    result = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    return result.stdout.strip().splitlines()[-1] if result.returncode == 0 else "unknown"


def _sources_digest() -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in (ROOT / "csrc").rglob("*") if p.is_file()) + [ROOT / "setup.py"]
    for path in files:
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def build_extension(python: str) -> Path:
    """The CUDA-built dimaskdino/_C*.so for `python`'s torch (built once per cache key)."""
    torch_version, python_tag = _probe(
        python,
        "import importlib.metadata as m, sys; print(m.version('torch')); print(sys.implementation.cache_tag)",
    ).splitlines()
    key_text = "\n".join([_sources_digest(), torch_version, python_tag, _nvcc_version(), CUDA_ARCHS])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    build = cache_root() / f"build-{key}"
    done = build / ".complete"
    with _locked(cache_root() / f"build-{key}.lock"):
        if not done.exists():
            shutil.rmtree(build, ignore_errors=True)
            build.mkdir(parents=True)
            env = _child_env_base()
            env.update(FORCE_CUDA="1", DIMASKDINO_CUDA_ARCHS=CUDA_ARCHS, MAX_JOBS=env.get("MAX_JOBS", str(os.cpu_count() or 1)))
            _run(
                [python, str(ROOT / "setup.py"), "build_ext", "--build-lib", str(build / "lib"), "--build-temp", str(build / "tmp")],
                build / "build.log", f"FORCE_CUDA=1 build of the extension for torch {torch_version}", cwd=ROOT, env=env,
            )
            shutil.rmtree(build / "tmp", ignore_errors=True)  # object files: only the .so is kept
            done.write_text(key_text + "\n")
    built = sorted((build / "lib" / "dimaskdino").glob("_C*.so"))
    if not built:
        raise CudaTorchUnavailable(f"the build in {build} produced no dimaskdino/_C*.so (log {build / 'build.log'})")
    return built[0]


def package_folder(extension: Path) -> Path:
    """A folder to put first on PYTHONPATH: dimaskdino/ = symlinks to this checkout's package
    (and kernels/ as dimaskdino.kernels, as pyproject maps it) plus the CUDA-built _C. Keyed by
    the checkout too, since worktrees share the build cache; refreshed on every call."""
    key = hashlib.sha256(f"{ROOT}\n{extension}".encode()).hexdigest()[:16]
    top = cache_root() / f"pkg-{key}"
    package = top / "dimaskdino"
    wanted = {entry.name: entry for entry in (ROOT / "dimaskdino").iterdir()
              if not entry.name.startswith("_C") and entry.name != "__pycache__"}
    wanted["kernels"] = ROOT / "kernels"
    wanted[extension.name] = extension
    with _locked(cache_root() / f"pkg-{key}.lock"):
        package.mkdir(parents=True, exist_ok=True)
        for entry in package.iterdir():
            if entry.name not in wanted or not entry.is_symlink() or Path(os.readlink(entry)) != wanted[entry.name]:
                entry.unlink() if entry.is_symlink() or entry.is_file() else shutil.rmtree(entry)
        for name, target in wanted.items():
            if not (package / name).is_symlink():
                (package / name).symlink_to(target)
    return top


@lru_cache(maxsize=1)
def cuda_torch_env() -> tuple[str, dict]:
    """(python, env): run the project's code under a CUDA build of torch, with the extension built
    for that torch (FORCE_CUDA=1, sm_90a). Raises CudaTorchUnavailable."""
    if os.environ.get("DIMASKDINO_NO_CUDA_TORCH") == "1":
        raise CudaTorchUnavailable("DIMASKDINO_NO_CUDA_TORCH=1")
    python = cuda_python()
    if _probe(python, "import torch; print(torch.version.cuda)") == "None":
        raise CudaTorchUnavailable(f"the torch of {python} is not a CUDA build")
    extension = build_extension(python)
    env = _child_env_base()
    env["PYTHONPATH"] = str(package_folder(extension))
    env["DIMASKDINO_CUDA_EXTENSION"] = str(extension)
    return python, env


def or_skip(make, *args):
    """make(*args) for a test: skipped with the reason where it raises CudaTorchUnavailable, failed
    under CI (CI=true), where it must work."""
    import pytest

    try:
        return make(*args)
    except CudaTorchUnavailable as error:
        if in_ci():
            pytest.fail(f"CI=true and {make.__name__} failed: {error}")
        pytest.skip(f"{make.__name__} unavailable: {error}")


def cuda_torch_or_skip() -> tuple[str, dict]:
    """cuda_torch_env() for a test: skipped with the reason where it is unavailable, failed under CI."""
    return or_skip(cuda_torch_env)


if __name__ == "__main__":
    python, env = cuda_torch_env()
    print(f"python: {python}\nPYTHONPATH={env['PYTHONPATH']}\nextension: {env['DIMASKDINO_CUDA_EXTENSION']}")
