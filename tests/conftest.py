import os

import pytest
import torch

# Without a GPU the Triton kernels are tested in the Triton interpreter. triton.jit decides at
# decoration time whether a kernel is interpreted, and dimaskdino imports its kernel modules
# lazily (on first use), so setting the variable here, before any test module runs, is enough. On
# a GPU machine the same tests run the compiled kernels on CUDA tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def record_host_syncs(monkeypatch) -> list[str]:
    """Records every call of a Tensor method that would synchronize a GPU with the host."""
    calls = []
    for method in ("item", "tolist", "cpu", "__bool__", "__int__", "__float__", "__index__"):
        real = getattr(torch.Tensor, method)

        def recorder(self, *args, _method=method, _real=real, **kwargs):
            calls.append(_method)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, recorder)
    return calls


def triton_cpu_reason(kernels: str) -> str | None:
    """None when the kernels of dimaskdino.kernels.<kernels> run in the interpreter here, else why not."""
    from dimaskdino.ops._triton import triton_status

    status = triton_status(kernels, "cpu")
    return None if status == "interpreted" else status


def triton_devices(kernels: str) -> list:
    """pytest params "cpu" (the interpreter; skipped with the reason when it cannot run) and
    "cuda" (gpu marker) for the kernels of dimaskdino.kernels.<kernels>."""
    reason = triton_cpu_reason(kernels)
    return [
        pytest.param("cpu", marks=pytest.mark.skipif(reason is not None, reason=str(reason))),
        pytest.param("cuda", marks=pytest.mark.gpu),
    ]


def cuda_available() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _skip_if_optional_missing():
    """A test (or its fixture) that reaches a feature whose optional package is missing is skipped
    with the message naming the package and extra; under CI (CI=true), where `.[test]` installs
    every extra, it fails instead."""
    from dimaskdino._optional import MissingOptionalDependency

    try:
        return (yield)
    except MissingOptionalDependency as error:
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            raise
        pytest.skip(str(error))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _skip_if_optional_missing())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _skip_if_optional_missing())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
