"""dimaskdino/ops/_triton.py: the per-call cost of asking which Triton implementation runs, and
what happens when the kernels cannot be imported."""

import types

from dimaskdino.ops import _triton


def test_kernels_interpreted_walks_the_kernel_module_once(monkeypatch):
    """Every op call asks (up to twice); walking the module with dir() cost ~9 us each time."""
    walks = []

    class CountingModule(types.ModuleType):
        def __dir__(self):
            walks.append(1)
            return super().__dir__()

    module = CountingModule("fake_kernels")
    module.some_kernel = object()
    monkeypatch.setattr(_triton, "kernel_module", lambda name: module)
    _triton.kernels_interpreted.cache_clear()
    try:
        assert [_triton.kernels_interpreted("fake_kernels") for _ in range(5)] == [False] * 5
        assert len(walks) == 1
    finally:
        _triton.kernels_interpreted.cache_clear()
