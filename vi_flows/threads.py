"""How many intra-op threads a fit's steps run on, chosen by timing them.

At the zoo's sizes a step gains little from a second thread and loses 5-30x when another process
holds a core (RESULTS.md, "Threads on a shared machine"); a large model's step gains from every
core. ``fit`` times a few steps each way and keeps the faster, restoring the caller's setting after.
"""

import contextlib
import statistics
import time

import torch

# A second thread must make a step this much faster to be kept: one thread is the safe choice on a
# machine other jobs share.
MIN_SPEEDUP = 1.2


@contextlib.contextmanager
def intra_op_threads(num_threads):
    """Run the block on ``num_threads`` intra-op threads, then restore the caller's setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def fastest_threads(step, rounds=3, reps=4):
    """1 or ``torch.get_num_threads()``, whichever runs ``step()`` faster (median of ``rounds``
    interleaved rounds of ``reps`` calls), the larger only if it is ``MIN_SPEEDUP`` times faster."""
    available = torch.get_num_threads()
    if available == 1:
        return 1
    seconds = {1: [], available: []}
    for _ in range(rounds):
        for num_threads, record in seconds.items():
            with intra_op_threads(num_threads):
                step()  # the first call after a change can pay for the thread pool
                start = time.perf_counter()
                for _ in range(reps):
                    step()
                record.append(time.perf_counter() - start)
    one, many = statistics.median(seconds[1]), statistics.median(seconds[available])
    return available if one > MIN_SPEEDUP * many else 1
