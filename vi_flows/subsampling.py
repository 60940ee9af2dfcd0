"""A plate's subsample in O(B) rather than O(N).

Pyro's plate draws its subsample of B of N items as ``randperm(N)[:B]``: 4.8 ms of a 16.5 ms step at
N = 10^6, B = 256 (``python benchmarks/local_scale.py _one step "AutoFlow (fit)" 1000000``). The first
B distinct values of a sequence of independent uniform draws are a uniformly random subsample without
replacement, in a random order: the same law. ``fit``'s steps draw 2B values and keep the first B
distinct ones, a fixed-shape computation that also compiles. Where B >= ``MIN_SUBSAMPLE`` and
N >= ``MIN_RATIO`` * B, the 2B draws repeat a value about 2B^2 / N <= B / 32 times on average, and
fewer than B distinct values come up with probability below (e / 32)^B < 1e-68; smaller plates keep
Pyro's draw. A data-parallel rank draws from its own shard the same way (:mod:`~vi_flows.data_parallel`).
"""

import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

MIN_SUBSAMPLE = 64
MIN_RATIO = 64


def distinct_uniform(size, count, device=None):
    """``count`` distinct integers drawn uniformly from ``range(size)`` without replacement, in a
    random order: the first ``count`` distinct values of ``2 * count`` independent uniform draws."""
    draws = torch.randint(size, (2 * count,), device=device)
    ordered, order = torch.sort(draws, stable=True)
    repeat = torch.cat([ordered.new_zeros(1, dtype=torch.bool), ordered[1:] == ordered[:-1]])
    repeats = torch.zeros_like(repeat).scatter(0, order, repeat)  # back in the order drawn
    first = torch.argsort(repeats.to(torch.uint8), stable=True)[:count]  # first occurrences, as drawn
    return draws[first]


def uniform_subsample(size, count, device=None):
    """``count`` of ``range(size)`` drawn uniformly without replacement: :func:`distinct_uniform`
    where that is safe (see the module's docstring), else Pyro's ``randperm(size)[:count]``."""
    if _drawn_in_order_b(size, count):
        return distinct_uniform(size, count, device)
    return torch.randperm(size, device=device)[:count]


class FastSubsamples(Messenger):
    """Large subsampled plates draw their subsample with :func:`distinct_uniform`; a subsample the
    program gives (``subsample=``, a replayed trace's, another handler's) is kept."""

    def _pyro_sample(self, msg):
        fn = msg["fn"]
        if not site_is_subsample(msg) or msg["value"] is not None or fn.subsample_size is None:
            return
        if _drawn_in_order_b(fn.size, fn.subsample_size):  # else Pyro's own draw
            msg["value"] = distinct_uniform(fn.size, fn.subsample_size, getattr(fn, "device", None))


def _drawn_in_order_b(size, count):
    return count >= MIN_SUBSAMPLE and size >= MIN_RATIO * count
