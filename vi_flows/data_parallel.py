r"""Data-parallel fitting on ``torch.distributed``: several processes, each stepping on its own shard
of every subsampled plate, share one fit (:func:`vi_flows.fit` with ``data_parallel``).

Each rank owns the items ``i`` with ``i % world_size == rank`` and draws its subsample of a plate
from them alone. Its loss, scaled by the plate's ``N / B`` as Pyro scales any subsample, is an
unbiased estimate of the full ELBO, so the mean of the ranks' gradients is one for a subsample of
``world_size * B`` items. That mean (one all-reduce of the loss and every gradient but the per-item tables')
moves every rank's global parameters alike; a per-item table row moves only on the rank that owns
its item (lazy Adam, :mod:`~vi_flows.item_steps`), so tables need no communication until the end,
when each row is taken from its owner. Between runs of steps each rank refits its own items' rows
and computes their slopes (:class:`Shard`), and the ranks exchange the results. The loss the
stopping rule and divergence guard read is the ranks' mean, so every rank stops, rolls back and
cuts its rate at the same step.

Where each rank's data are its own share of the items (``data_parallel="own-data"``: a rank's model
holds only its items of every subsampled plate, as a rank that loads its shard of a dataset too
large for one machine), a rank's subsamples are drawn from all of its plate, its per-item tables
hold its items only and are never exchanged, and every site of a subsampled plate weighs
``world_size`` times (:class:`ScaledItems`): the ranks' mean loss is again an unbiased estimate
of the full ELBO, the globals' terms counted once.

Launched by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``):
``fit`` then starts the default process group (gloo on CPU, NCCL on a GPU) if the script has not,
and ends it afterwards.
"""

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .subsampling import uniform_subsample


OWN_DATA = "own-data"


def requested(data_parallel):
    """What ``fit``'s ``data_parallel`` (``True``, ``False``, ``"auto"`` or ``"own-data"``) asks for:
    ``"auto"`` is True where a process group of two or more ranks exists or ``torchrun`` started this
    process as one of several."""
    if data_parallel not in (True, False, "auto", OWN_DATA):
        raise ValueError(f"data_parallel must be True, False, 'auto' or {OWN_DATA!r}, got {data_parallel!r}")
    if data_parallel == "auto":
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size() > 1
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    return data_parallel


@contextlib.contextmanager
def process_group(device):
    """The default process group: the caller's, or one started here from ``torchrun``'s environment
    (NCCL for a CUDA ``device``, else gloo) and destroyed on leaving."""
    if dist.is_initialized():
        yield
        return
    if "WORLD_SIZE" not in os.environ:
        raise RuntimeError(
            "data_parallel=True needs several processes: launch the script with torchrun --nproc-per-node N, "
            "or call torch.distributed.init_process_group before fit"
        )
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend)
    try:
        yield
    finally:
        dist.barrier()  # gloo aborts a rank that leaves while a peer still talks to it
        dist.destroy_process_group()


@dataclass(frozen=True)
class Shard:
    """The items ``i % world_size == rank`` of a subsampled plate, which rank ``rank`` owns: where its
    steps draw their subsamples (:class:`ShardedSubsamples`), and its share of the work between runs
    of steps (the items' refits and slopes)."""

    rank: int
    world_size: int

    def items(self, size, rank=None):
        """This rank's (or ``rank``'s) items of a plate of ``size`` items, in order."""
        return torch.arange(self.rank if rank is None else rank, size, self.world_size)

    def count(self, size, rank=None):
        """How many items of a plate of ``size`` items this rank (or ``rank``) owns."""
        return len(range(self.rank if rank is None else rank, size, self.world_size))

    @torch.no_grad()
    def sum(self, tensor):
        """``tensor`` summed over the ranks, in place."""
        dist.all_reduce(tensor)
        return tensor

    @torch.no_grad()
    def max(self, tensor):
        """``tensor``'s largest values over the ranks, in place."""
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    @torch.no_grad()
    def gather(self, rows, dim, size):
        """``[(items, rows)]`` of every rank, in rank order: its :meth:`items` of a plate of ``size`` items
        and its ``rows`` of them, along dimension ``dim``."""
        longest = self.count(size, 0)
        padding = list(rows.shape)
        padding[dim] = longest - rows.shape[dim]
        padded = torch.cat([rows, rows.new_zeros(padding)], dim).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return [(self.items(size, rank), part.narrow(dim, 0, self.count(size, rank))) for rank, part in enumerate(parts)]


class ShardedSubsamples(Messenger):
    """Every subsampled plate draws its subsample from the items of ``shard`` (a :class:`Shard`); a
    subsample the program gives (``subsample=``, or a replayed trace's) is kept."""

    def __init__(self, shard):
        super().__init__()
        self.shard = shard

    def _pyro_sample(self, msg):
        fn = msg["fn"]
        if not site_is_subsample(msg) or msg["value"] is not None or fn.subsample_size is None or fn.subsample_size >= fn.size:
            return
        owned = self.shard.count(fn.size)
        if fn.subsample_size > owned:
            raise ValueError(
                f"plate {msg['name']!r} draws {fn.subsample_size} of {fn.size} items per step, and each of {self.shard.world_size} "
                f"ranks owns {owned}: use a subsample size of at most {owned} per rank"
            )
        # The shard's k-th item is rank + k * world_size: drawn in O(B) where the shard is large.
        msg["value"] = self.shard.rank + self.shard.world_size * uniform_subsample(owned, fn.subsample_size, fn.device)


class ScaledItems(Messenger):
    """Every site in a subsampled plate weighs ``factor`` times more (on top of the plate's N / B)."""

    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def _pyro_sample(self, msg):
        if not site_is_subsample(msg) and any(frame.full_size is not None and frame.full_size > frame.size for frame in msg["cond_indep_stack"]):
            msg["scale"] = msg["scale"] * self.factor


def rank():
    """This process's rank: the process group's, or ``torchrun``'s before one exists (0 alone)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


class DataParallel:
    """What ``fit``'s steps do across the ranks of the default process group (see the module's
    docstring), for the trained tensors ``params`` of which ``tables`` are per-item tables; with
    ``own_data``, each rank's model holding its own items."""

    def __init__(self, params, tables, own_data=False):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        table_ids = {id(table) for table in tables}
        self.params = list(params)
        self.is_table = [id(param) in table_ids for param in params]
        self.tables = [param for param in params if id(param) in table_ids]
        self.own_data = own_data
        self.shard = None if own_data else Shard(self.rank, self.world_size)

    def wrap(self, fn):
        """The model or guide ``fn`` as this rank runs it: on its shard of the items, or with its own
        items weighing ``world_size`` times."""
        return ScaledItems(self.world_size)(fn) if self.own_data else ShardedSubsamples(self.shard)(fn)

    @torch.no_grad()
    def broadcast(self, tensors):
        """Give every rank rank 0's ``tensors`` (the start: random initialisations differ by rank),
        but for the tables of a rank's own items."""
        for tensor in tensors:
            if not (self.own_data and any(tensor is table for table in self.tables)):
                dist.broadcast(tensor, src=0)

    @torch.no_grad()
    def average(self, loss, gradients):
        """``(loss, gradients)`` of ``params`` (a gradient None: zero) with the loss and the shared
        parameters' gradients replaced by their means over the ranks, in one all-reduce."""
        shared = [index for index, is_table in enumerate(self.is_table) if not is_table]
        pieces = [gradients[index] if gradients[index] is not None else torch.zeros_like(self.params[index]) for index in shared]
        flat = torch.cat([loss.reshape(1).to(self.params[0].dtype), *(piece.reshape(-1) for piece in pieces)])
        dist.all_reduce(flat)
        flat /= self.world_size
        averaged = list(gradients)
        mean_loss, *means = flat.split([1, *(piece.numel() for piece in pieces)])
        for index, piece in zip(shared, means):
            averaged[index] = piece.view_as(self.params[index])
        return mean_loss.reshape(()), averaged

    @torch.no_grad()
    def combine_noise(self, noise):
        """The noise of the ranks' mean step in each global, in posterior sds, from this rank's step's
        ``noise``: the mean of ``world_size`` steps on the shared items, or the root of the sum of
        the ranks' squares where each holds its own items (weighing ``world_size`` times)."""
        if not self.own_data:
            return noise / math.sqrt(self.world_size)
        return self._sum(noise.pow(2)).sqrt()

    @torch.no_grad()
    def combine_shift(self, shift):
        """The globals' shift were every item's rows refitted, from this rank's: each rank measures
        all of the shared items, or the ranks' shifts add where each holds its own (the shift is
        linear in the change of the items' slopes)."""
        return self._sum(shift) if self.own_data else shift

    def _sum(self, tensor):
        total = tensor.detach().clone()
        dist.all_reduce(total)
        return total

    @torch.no_grad()
    def gather_tables(self, optimizer):
        """Give every rank each table element from the rank whose steps moved it: the fitted guide,
        whole, on every rank. Lazy Adam (:mod:`~vi_flows.item_steps`) leaves an element's second
        moment (``optimizer``'s state) at zero until a step with its item moves it, and moves only
        this rank's items; the elements no rank moved are the same on all. Ranks holding their own
        data keep their own tables."""
        if self.own_data:
            return
        for table in self.tables:
            state = optimizer.state.get(table, {})
            moved = state["exp_avg_sq"] > 0 if "exp_avg_sq" in state else torch.zeros_like(table, dtype=torch.bool)
            values, count = table * moved, moved.to(table.dtype)
            dist.all_reduce(values)
            dist.all_reduce(count)
            # Divided by the count for a plate that is not subsampled, whose items every rank steps.
            table.copy_(torch.where(count > 0, values / count.clamp(min=1), table))
