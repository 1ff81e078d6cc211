"""benchmarks/conftest.py's CPU peak memory: the live peak of the bytes autograd saves."""

import torch

from benchmarks.conftest import PeakMemory

MB = 2 ** 20


def _saved(n_floats):
    """A graph that saves one fresh n_floats tensor for backward (exp saves its output)."""
    return torch.randn(n_floats, requires_grad=True).exp()


def test_counts_what_the_graphs_hold_at_once():
    mem = PeakMemory()
    mem(lambda: [_saved(MB // 4) for _ in range(3)])   # three graphs alive together
    assert mem.peak == 3 * MB


def test_a_graph_freed_inside_the_call_stops_counting():
    def sequential():
        for _ in range(3):
            y = _saved(MB // 4)
            y.sum().backward()                       # frees y's saved tensor
            del y

    mem = PeakMemory()
    mem(sequential)
    assert mem.peak == MB


def test_one_storage_saved_twice_counts_once():
    def twice():
        x = torch.randn(MB // 4, requires_grad=True)
        y = x * 2
        return y * y, y.sin()                        # y saved by two nodes

    mem = PeakMemory()
    mem(twice)
    assert mem.peak == MB
