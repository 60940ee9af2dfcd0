r"""Adam on the per-item tables, lazily: an item's row and its moments move only in the steps whose
subsample holds the item (the semantics of TensorFlow's ``LazyAdam`` and torch's ``SparseAdam``).

Plain Adam keeps stepping a row between its visits on the momentum of its last one, about ten times
that visit's step, and scales each element by its own running size, so that a gradient of round-off
moves a row as far as a real one. A conjugate item's pseudo-observation is exact from its start
(:mod:`~vi_flows.autoflow.local_initialization`), and its path-derivative gradient there is
round-off: with N = 10^5 groups subsampled to 256 (``benchmarks/local_scale.py``) its rows wandered by
up to 0.28 in loc and 0.58 in log precision (lazily: 0.03 and 0.05), and the ELBO, which charges every
row's error through the globals, pulled tau low. Where every item is in every step, lazy Adam is Adam.

An eager step masks the rows without a gradient. The compiled step works on the rows read alone
(:class:`TableReads`): their gradient, their update, written back in place, so that its cost follows
the subsample, not the table (``python benchmarks/local_scale.py step``).
"""

from dataclasses import dataclass

import torch
from pyro.poutine.messenger import Messenger

from .pyro_internals import after_every_handler, forget_subsample, subsample_of

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


class TableReads(Messenger):
    """Records each read of the per-item ``tables`` (unconstrained parameters read as ``pyro.param``
    with an ``event_dim``) in the program it handles: ``reads``, a list of ``(table, value read,
    (dim, indices) of the plate's subsample, or None where the table was read whole)``."""

    def __init__(self, tables):
        super().__init__()
        self._tables = {id(table): table for table in tables}
        self.reads = []

    def _pyro_post_param(self, msg):
        # Handlers inside this one (the model's plates) have not subsampled the value yet: it is the
        # table itself where the parameter is unconstrained.
        table = self._tables.get(id(msg["value"]))
        if table is not None:
            after_every_handler(msg, lambda msg: self.reads.append((table, msg["value"], None if msg["value"] is table else subsample_of(table))))

    def __exit__(self, *args):
        for table in self._tables.values():  # the indices of a traced run are the trace's
            forget_subsample(table)
        return super().__exit__(*args)

    def rows(self, params):
        """The reads as :class:`TableRows` of ``params`` (the step's trained tensors), and the reads'
        values and indices in its order; None where some table was read whole, or along several
        subsamples (a loop over particles draws one per particle): those steps mask their rows."""
        if not self.reads:
            return None
        by_table = {}  # id(table): ((dim, indices), [values])
        for table, value, subsample in self.reads:
            if subsample is None:
                return None
            (dim, indices), values = by_table.setdefault(id(table), (subsample, []))
            if dim != subsample[0] or indices is not subsample[1]:
                return None
            values.append(value)
        positions = {id(param): position for position, param in enumerate(params)}
        entries = [(positions[key], dim, indices, values) for key, ((dim, indices), values) in by_table.items()]
        layout = TableRows(
            positions=tuple(position for position, *_ in entries),
            dims=tuple(dim for _, dim, *_ in entries),
            counts=tuple(len(values) for *_, values in entries),
        )
        return layout, [value for *_, values in entries for value in values] + [indices for _, _, indices, _ in entries]


@dataclass(frozen=True)
class TableRows:
    """Which of a step's parameters are tables read by rows: ``positions`` among the parameters, the
    ``dims`` their rows lie along, and ``counts``, how many reads each. A loss graph with a
    ``table_rows`` returns after the loss every read's rows, table by table, then each table's indices."""

    positions: tuple
    dims: tuple
    counts: tuple

    def split(self, outputs):
        """``(reads, indices)`` of a loss graph's outputs after the loss: per table, its reads' rows and its indices."""
        reads, start = [], 0
        for count in self.counts:
            reads.append(outputs[start : start + count])
            start += count
        return reads, outputs[start:]
