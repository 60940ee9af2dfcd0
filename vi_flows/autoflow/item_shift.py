r"""Whether a subsampled fit's items' rows have converged, read where it matters: how far the globals
would move if every item's rows were refitted to their optimum (:mod:`~vi_flows.autoflow.item_refit`).

The globals see each item through its collapsed evidence :math:`e_i(\theta)`
(:mod:`~vi_flows.autoflow.item_slopes`). Refitting the rows changes the sum of its slopes at the
posterior mean by :math:`\Delta G`; one Newton step of the globals, :math:`\Sigma\, \Delta G` with
:math:`\Sigma` the guide's posterior covariance of the globals, says how far their optimum moves,
here in posterior sds. Rows that a step visits a few times from a start that is not their optimum
(a likelihood that is not Gaussian in the item) moved the globals of 20,000 Poisson groups in
subsamples of 64 by 0.7-1.5 sds when not refitted (RESULTS.md, "A hierarchy that is not conjugate").
"""

import torch

from .item_refit import refit_items, refittable
from .item_slopes import all_item_slopes

NUM_DRAWS = 1000


@torch.no_grad()
def item_shift(guide, *args, num_draws=NUM_DRAWS, shard=None, **kwargs):
    """Per coordinate of a set-up ``AutoFlow``'s packed globals (unconstrained), the Newton step of
    the globals after refitting every item's rows, in posterior sds (``num_draws`` of the guide's
    draws), its rows left as they were; None where its rows cannot be refitted. With a ``shard``
    (data-parallel, every rank calling) each rank refits and takes the slopes of its own items."""
    if refittable(guide):
        return None
    with torch.random.fork_rng():
        torch.manual_seed(0)
        draws = guide.get_posterior().sample((num_draws,))
    anchor = draws.mean(0)
    tables = guide.item_tables()
    kept = [table.detach().clone() for table in tables]
    try:
        before = all_item_slopes(guide, anchor, *args, shard=shard, **kwargs).sum(0)
        if refit_items(guide, *args, shard=shard, **kwargs) is None:  # a chain of local sites
            return None
        after = all_item_slopes(guide, anchor, *args, shard=shard, **kwargs).sum(0)
    finally:
        for table, value in zip(tables, kept):
            table.copy_(value)
    covariance = torch.atleast_2d(torch.cov(draws.T))
    return covariance @ (after - before) / draws.std(0)
