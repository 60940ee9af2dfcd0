"""What ``fit`` checks at the end of a fit on subsamples, in the globals' posterior sds, with a
warning where it would not trust the result: the noise of a step's slope, and how far the globals
stand from where every item's rows, refitted, would put them."""

import math
import warnings

from .data_parallel import rank
from .messages import first_line

# A subsampled fit warns where a step's slope is noisier than this many posterior sds in some global
# (vi_flows.autoflow.subsample_noise). Measured on benchmarks/local_scale.py's hierarchy, fits of two
# seeds without the control variate (RESULTS.md): at a noise of 7 the globals ended 0.03-0.16 sds off,
# at 12 0.13-0.34, at 68 up to 1.24, with tau's sd at 0.42 of exact.
MAX_SUBSAMPLE_NOISE = 10.0
# ... and where refitting the items' rows would move a global by more than this many posterior sds
# (vi_flows.autoflow.item_shift): issue 19's accuracy criterion for the globals.
MAX_ITEM_SHIFT = 0.1


def check_subsample_noise(guide, control_variate, *args, combine=None, **kwargs):
    """The largest noise of a step's slope in a global, in posterior sds, of a guide that measures it
    (``subsample_noise``, with the step's ``control_variate``; data-parallel, ``combine`` maps this
    rank's noise to the ranks' mean step's), with a warning above ``MAX_SUBSAMPLE_NOISE``."""
    noise = _measure(guide, "subsample_noise", "the subsample's noise in the globals", *args, control_variate=control_variate, **kwargs)
    if not isinstance(noise, dict):
        return noise
    site, worst = _worst(noise, combine)
    if worst > MAX_SUBSAMPLE_NOISE and rank() == 0:  # data-parallel, every rank measures about the same
        warnings.warn(
            f"each step's subsample moves the slope in {site!r} by about {worst:.0f} of its posterior sds (the noise grows "
            f"as sqrt(items / subsample size)); above {MAX_SUBSAMPLE_NOISE:.0f} the fitted globals can be off by tenths of "
            "a posterior sd or more, their sds too small. Fit with a larger subsample_size, or check against a full-batch fit."
        )
    return worst


def check_item_shift(guide, *args, shard=None, combine=None, **kwargs):
    """The largest shift of a global, in posterior sds, were every item's rows refitted, of a guide
    that measures it (``item_shift``; data-parallel, each rank refitting its ``shard``'s items, and
    ``combine`` mapping this rank's shift to the ranks'), with a warning above ``MAX_ITEM_SHIFT``."""
    shift = _measure(guide, "item_shift", "how far the items' rows are from their optimum", *args, shard=shard, **kwargs)
    if not isinstance(shift, dict):
        return shift
    site, worst = _worst(shift, lambda value: (combine(value) if combine is not None else value).abs())
    if worst > MAX_ITEM_SHIFT and rank() == 0:
        warnings.warn(
            f"the items' per-item rows have not converged: refitted to their optimum, they would move {site!r} by about "
            f"{worst:.2f} of its posterior sds. Each step visits an item items / subsample size times fewer than the "
            "globals: fit longer, with a larger subsample_size, or with refit_items=True where it was off."
        )
    return worst


def _measure(guide, method, what, *args, **kwargs):
    """``guide.method(*args, **kwargs)``, a dict; 0.0 where the guide measures nothing (the method
    missing or giving an empty dict), NaN with a warning where measuring failed (the fit stands)."""
    measure = getattr(guide, method, None)
    try:
        found = measure(*args, **kwargs) if measure is not None else {}
    except (NotImplementedError, RuntimeError, ValueError) as failure:
        warnings.warn(f"fit could not measure {what} ({first_line(failure)})")
        return math.nan
    return found or 0.0


def _worst(values, combine=None):
    """``(site, largest value)`` of ``{site: tensor}``, each tensor mapped by ``combine`` first."""
    combine = combine if combine is not None else (lambda value: value)
    return max(((name, combine(value).max().item()) for name, value in values.items()), key=lambda pair: pair[1])
