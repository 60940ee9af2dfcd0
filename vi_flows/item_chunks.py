"""Model and guide over every item of a subsampled plate, a subsample at a time, at fixed draws of the
globals: what an export reads where one run of a subsampled model holds B of N items, in memory
that follows B, not N.

The runs take the subsamples ``arange(start, start + B) % N`` for ``start = 0, B, 2B, ...``: the last
wraps around, and only its first ``N - start`` items are new (``kept``). A site in the plate gives
its values and densities over the kept items of every run, stitched along the plate's axis, its
densities without the plate's scale N / B; a site outside it, those of the first run.
"""

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .pyro_internals import latent_site


class _GivenSubsample(Messenger):
    """The plate ``name`` takes the subsample ``indices``."""

    def __init__(self, name, indices):
        super().__init__()
        self.name, self.indices = name, indices

    def _pyro_sample(self, msg):
        if site_is_subsample(msg) and msg["name"] == self.name:
            msg["value"] = self.indices


def item_subsamples(frame):
    """``(indices, kept)`` of the runs covering the items of the subsampled plate ``frame``."""
    for start in range(0, frame.full_size, frame.size):
        yield torch.arange(start, start + frame.size) % frame.full_size, min(frame.size, frame.full_size - start)


def chunked_traces(guide, model, frame, num_draws, particle_plate, nesting, *args, **kwargs):
    """Yield ``(guide_trace, model_trace, kept)`` of runs vectorised over ``num_draws`` draws (a plate
    ``particle_plate`` left of the model's ``nesting`` plates) covering the items of the subsampled
    plate ``frame``, the draws of an ``AutoContinuous`` guide's packed globals the same in every run."""
    name = latent_site(guide)
    latent = None
    if guide.latent_dim:  # left of the model's plates, as a vectorised run draws it
        latent = guide.get_posterior(*args, **kwargs).sample((num_draws,)).reshape((num_draws,) + (1,) * nesting + (-1,))
    conditioned = poutine.condition(guide, data={name: latent}) if latent is not None else guide
    for indices, kept in item_subsamples(frame):
        with pyro.plate(particle_plate, num_draws, dim=-nesting - 1), _GivenSubsample(frame.name, indices):
            guide_trace = poutine.trace(conditioned).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        guide_trace.compute_log_prob()
        model_trace.compute_log_prob()
        yield guide_trace, model_trace, kept


class Stitched:
    """One kind of per-site tensor over :func:`chunked_traces`' runs: ``add(name, tensor, axis, kept,
    first)`` with the plate's axis ``axis`` from the right of ``tensor`` (None for a site outside
    the plate, kept from the ``first`` run only); ``result()``, ``{name: tensor}`` over every item."""

    def __init__(self):
        self._pieces, self._axes = {}, {}

    def add(self, name, tensor, axis, kept, first):
        if axis is None:
            if first:
                self._pieces[name], self._axes[name] = [tensor], None
            return
        self._axes[name] = tensor.dim() - axis
        self._pieces.setdefault(name, []).append(tensor.narrow(tensor.dim() - axis, 0, kept))

    def result(self):
        return {name: pieces[0] if self._axes[name] is None else torch.cat(pieces, self._axes[name]) for name, pieces in self._pieces.items()}


def plate_axis(site, frame):
    """The plate's axis in a site's batch shape, counted from the right (``-frame.dim``), or None
    for a site outside the plate."""
    inside = any(other.name == frame.name for other in site["cond_indep_stack"])
    return -frame.dim if inside else None


def per_draw_log_density(trace, frame, kept, first, num_draws):
    """``(num_draws,)``: a run's log density per draw over its kept items (the plate's scale taken
    out) and, in the ``first`` run, the sites outside the plate."""
    total = 0.0
    for site in trace.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        axis = plate_axis(site, frame)
        if axis is None and not first:
            continue
        log_prob = site["log_prob"]
        if axis is not None:
            log_prob = log_prob.narrow(log_prob.dim() - axis, 0, kept) * (frame.size / frame.full_size)
        total = total + log_prob.reshape(num_draws, -1).sum(-1)
    return total
