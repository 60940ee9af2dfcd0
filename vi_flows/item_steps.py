r"""Adam on the per-item tables, lazily: an item's row and its moments move only in the steps whose
subsample holds the item (the semantics of TensorFlow's ``LazyAdam`` and torch's ``SparseAdam``).

Plain Adam keeps stepping a row between its visits on the momentum of its last one, about ten times
that visit's step, and scales each element by its own running size, so that a gradient of round-off
moves a row as far as a real one. A conjugate item's pseudo-observation is exact from its start
(:mod:`~vi_flows.autoflow.local_initialization`), and its path-derivative gradient there is
round-off: with N = 10^5 groups subsampled to 256 (``benchmarks/local_scale.py``) its rows wandered by
up to 0.28 in loc and 0.58 in log precision (lazily: 0.03 and 0.05), and the ELBO, which charges every
row's error through the globals, pulled tau low. Where every item is in every step, lazy Adam is Adam.
"""

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")  # torch.optim.Adam's names


def lazy_mask(gradient):
    """The elements of a per-item table in this step's subsample: those with a gradient."""
    return gradient != 0


@torch.no_grad()
def lazy_adam_step(optimizer, tables):
    """``optimizer.step()`` (a ``torch.optim.Adam``), then each of ``tables`` (among its parameters)
    put back, with its moments, where its gradient is zero: the items outside this step's subsample."""
    tables = [table for table in tables if table.grad is not None]  # Adam leaves the others alone
    masks = [lazy_mask(table.grad) for table in tables]
    before = [[table.clone()] + [optimizer.state[table].get(key, torch.zeros_like(table)).clone() for key in MOMENTS] for table in tables]
    optimizer.step()
    for table, mask, old in zip(tables, masks, before):
        for tensor, value in zip([table] + [optimizer.state[table][key] for key in MOMENTS], old):
            tensor.copy_(torch.where(mask, tensor, value))
