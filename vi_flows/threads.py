"""How many intra-op threads a fit's steps (or a NUTS reference's chains) run on, chosen by timing them.

At the zoo's sizes a step gains little from a second thread and loses 5-30x when another process
holds a core (RESULTS.md, "Threads on a shared machine"); a large model's step gains from every
core. ``fit`` and :func:`~vi_flows.reference.nuts_reference` time a few steps each way and keep the
faster, restoring the caller's setting after.
"""

import contextlib
import statistics
import time

import torch

# More threads must make a step this much faster to be kept, and a step must take this long on one
# thread for the difference to be more than timer noise: one thread is the safe choice on a machine
# other jobs share.
MIN_SPEEDUP = 1.2
MIN_SECONDS = 1e-4


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
    interleaved rounds of ``reps`` calls), the larger only if it is ``MIN_SPEEDUP`` times faster on a
    step of at least ``MIN_SECONDS``."""
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
    return available if one > MIN_SPEEDUP * many and one > MIN_SECONDS * reps else 1
