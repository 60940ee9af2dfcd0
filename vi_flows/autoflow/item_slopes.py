r"""Each item's slope in the globals of its collapsed evidence: what a subsampled step's control
variate reads (:mod:`~vi_flows.control_variates`) and how its noise is measured
(:mod:`~vi_flows.autoflow.subsample_noise`).

A local posterior stands for item :math:`i`'s likelihood of the globals :math:`\theta` with its
pseudo-observation: :math:`e_i(\theta) = \log N(a_i;\, m(\theta), s(\theta)^2 + 1/\beta_i)`, the item
integrated out (:meth:`~vi_flows.autoflow.local.LocalPosterior.evidence`). Where the pseudo-observation
matches the likelihood (a conjugate item, from its start), an item's share of the ELBO's gradient
in :math:`\theta` is exactly :math:`\nabla e_i`; elsewhere it is close.

The slopes of a subsample's items, :math:`(B, D)` for :math:`D` global coordinates, are one backward
pass with a weight per item, then one more per coordinate, differentiating in the weights.
"""

import functools

import torch

from .. import pyro_internals
from ..control_variates import LinearControlVariate
from .local_initialization import evidence_terms, fixed_subsamples


def subsampled_plate(guide):
    """``(plate, frame)`` of the one subsampled plate of ``guide``'s local posteriors, or None."""
    posterior = getattr(guide, "locals", None)
    if posterior is None or not posterior.subsampled:
        return None
    ((plate, frame),) = posterior.subsampled.items()  # one at most (LocalPosterior)
    return plate, frame


def evidence_control_variate(guide, *args, **kwargs):
    """A :class:`~vi_flows.control_variates.LinearControlVariate` of the items' collapsed evidence
    for a set-up ``AutoFlow`` with globals, not yet anchored; None where no plate of its local
    posteriors is subsampled."""
    found = subsampled_plate(guide)
    if found is None:
        return None
    plate, frame = found
    slopes = functools.partial(_all_item_slopes, guide, args, kwargs)
    return LinearControlVariate(pyro_internals.latent_site(guide), plate, frame.full_size, guide.get_posterior, slopes, guide.centre)


def item_slopes(guide, latent, indices, *args, **kwargs):
    """``(B, D)``: the slope of each item's collapsed evidence at the packed unconstrained globals
    ``latent``, for the items ``indices`` (``{plate: (B,) tensor}``) of the model run ``model(*args, **kwargs)``."""
    point = latent.detach().clone().requires_grad_()
    with torch.enable_grad():
        evidence = item_evidence(guide, point, indices, *args, **kwargs)
        if not evidence.requires_grad:  # no item's evidence follows the globals
            return evidence.new_zeros(evidence.shape + point.shape)
        weights = torch.ones_like(evidence, requires_grad=True)
        (weighted,) = torch.autograd.grad(evidence, point, grad_outputs=weights, create_graph=True)
        columns = [_derivative(coordinate, weights) for coordinate in weighted.unbind()]
    return torch.stack(columns, -1).detach()


def all_item_slopes(guide, latent, *args, shard=None, **kwargs):
    """``(N, D)``: :func:`item_slopes` of every item of the subsampled plate, a subsample at a time;
    with a ``shard`` (:class:`~vi_flows.data_parallel.Shard`, every rank calling), each rank computes
    its own items' and the ranks sum their tables."""
    plate, frame = subsampled_plate(guide)
    slopes = latent.new_zeros(frame.full_size, latent.numel())
    for indices in fixed_subsamples(guide.locals, None, shard):
        slopes[indices[plate]] = item_slopes(guide, latent, indices, *args, **kwargs)
    return slopes if shard is None else shard.sum(slopes)


def item_evidence(guide, latent, indices, *args, **kwargs):
    """``(B,)``: each item's collapsed evidence at ``latent`` (summed over its sites and coordinates)."""
    plate, frame = subsampled_plate(guide)
    terms, _, _ = evidence_terms(guide, latent, indices, *args, **kwargs)
    total = latent.new_zeros(len(indices[plate]))
    for name, value in terms.items():
        dim = frame.dim - guide.locals.event_dims[name]
        total = total + value.movedim(dim, 0).reshape(value.shape[dim], -1).sum(-1)
    return total


def _all_item_slopes(guide, args, kwargs, latent, shard):
    return all_item_slopes(guide, latent, *args, shard=shard, **kwargs)


def _derivative(output, weights):
    if not output.requires_grad:  # this coordinate's slope does not vary with the items
        return torch.zeros_like(weights)
    (column,) = torch.autograd.grad(output, weights, retain_graph=True, allow_unused=True)
    return torch.zeros_like(weights) if column is None else column
