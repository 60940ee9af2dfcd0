r"""Where the local posteriors start: each item's likelihood, Laplace-approximated.

At the globals' starting point, a few damped Newton steps per item find the mode :math:`u^*` of
each local coordinate's log joint in unconstrained space and its curvature :math:`H`; dividing that
Laplace approximation by the site's Gaussian prior :math:`N(m, s^2)` leaves the pseudo-observation
:math:`\beta = H - 1/s^2` and :math:`a = u + g/\beta`, where :math:`g` is the likelihood's slope at the point
:math:`u` the steps reached (:math:`a = (H u^* - m/s^2)/\beta` at the mode): the item's likelihood, Gaussian-approximated.
Exact in one step where the likelihood is Gaussian (a conjugate hierarchy), and independent of where
the globals start there, so a fit neither starts every item at the prior's guess nor waits for a
subsampled item's turn to move it. Curvatures are the diagonal of each item's Hessian, one
Hessian-vector product per coordinate of an item reading it in every item at once.
"""

import contextlib
import functools
import itertools
from operator import attrgetter

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to

from ..pyro_internals import unpack_latent
from .local import LocalSampler
from .local_gaussian import gaussian_prior
from .pseudo_observations import PerItem

NEWTON_STEPS = 8
# The globals' Laplace start reads the items of at most this many subsamples.
COLLAPSED_SUBSAMPLES = 64
# An amortised encoder's affine part starts at the least-squares fit over this many subsamples.
AMORTIZED_START_SUBSAMPLES = 16
# Pseudo-observations at least this share of the prior's precision: an item whose data say nothing
# starts at its prior.
MIN_PRECISION_SHARE = 1e-3


@torch.no_grad()
def start_locals(guide, *args, **kwargs):
    """Start ``guide.locals`` at its items' likelihoods, Laplace-approximated at the guide's centre:
    every item's table rows (per item) or the encoders' affine maps, fitted by least squares over
    ``AMORTIZED_START_SUBSAMPLES`` subsamples (amortised)."""
    posterior = guide.locals
    global_values, _ = constrained_values(guide, guide.centre)
    per_item = isinstance(posterior.pseudo_observations, PerItem)
    rows = []
    for indices in _subsamples(posterior, None if per_item else AMORTIZED_START_SUBSAMPLES):
        locs, precisions, trace, indices = likelihood_laplace(posterior, global_values, indices, *args, **kwargs)
        if per_item:
            for name in posterior.names:
                write_rows(posterior, name, indices, locs[name], precisions[name])
        else:
            rows.append((posterior.item_features(trace), locs, precisions))
    if rows:
        _fit_encoders(posterior, rows)


def collapsed_log_joint(guide, latent, *args, max_subsamples=COLLAPSED_SUBSAMPLES, **kwargs):
    """The log density of the globals' packed unconstrained vector ``latent`` with every local site
    integrated out against its pseudo-observations (:meth:`~vi_flows.autoflow.local.LocalPosterior.evidence`),
    up to a constant: the globals' prior, the data outside the local plates, and each item's
    evidence, over at most ``max_subsamples`` subsamples (None: all), scaled to every item. It is
    the sum of :func:`collapsed_terms`, so a caller can also take the derivatives term by term."""
    return sum(term(latent) for term in collapsed_terms(guide, *args, max_subsamples=max_subsamples, **kwargs))


def collapsed_terms(guide, *args, max_subsamples=COLLAPSED_SUBSAMPLES, with_globals=True, **kwargs):
    """:func:`collapsed_log_joint` as a list of functions of ``latent``, one per subsample (the first
    also carries the globals' own terms, unless ``with_globals`` is false), the same subsamples at every call."""
    posterior = guide.locals
    subsamples = fixed_subsamples(posterior, max_subsamples)
    scale = 1.0
    if posterior.subsampled:
        ((plate, frame),) = posterior.subsampled.items()
        scale = frame.full_size / (frame.size * len(subsamples))
    return [functools.partial(_collapsed_term, guide, indices, scale, with_globals and index == 0, args, kwargs) for index, indices in enumerate(subsamples)]


def evidence_terms(guide, latent, indices, *args, **kwargs):
    """``(terms, trace, log_jacobian)`` of one run of the model at the packed unconstrained globals
    ``latent`` on the subsample ``indices``: each local site's evidence per coordinate
    (:meth:`~vi_flows.autoflow.local.LocalPosterior.evidence`), the run's trace, and the log-Jacobian
    of the globals' maps to their supports."""
    global_values, log_jacobian = constrained_values(guide, latent)
    terms = {}
    with torch.random.fork_rng(), poutine.block():  # the locals' draws are not used: no trace of them
        trace = guide.locals._run(global_values, {}, indices, *args, evidence=terms, **kwargs)
    return terms, trace, log_jacobian


def _collapsed_term(guide, indices, scale, with_globals, args, kwargs, latent):
    posterior = guide.locals
    terms, trace, log_jacobian = evidence_terms(guide, latent, indices, *args, **kwargs)
    evidence = scale * sum((term.sum() for term in terms.values()), latent.new_zeros(()))  # a tensor even where no prior is Gaussian
    if not with_globals:
        return evidence
    outside = [site for site in trace.nodes.values() if _counts(site) and site["is_observed"] and not _in_local_plates(posterior, site)]
    return log_jacobian + evidence + sum(_unscaled_log_prob(site) for site in outside)


def constrained_values(guide, latent):
    """``({site: value in its support}, log-Jacobian of the maps there)`` of a packed unconstrained latent."""
    values, log_jacobian = {}, 0.0
    for site, unconstrained in unpack_latent(guide, latent):
        to_support = biject_to(site["fn"].support)
        values[site["name"]] = value = to_support(unconstrained)
        log_jacobian = log_jacobian + to_support.log_abs_det_jacobian(unconstrained, value).sum()
    return values, log_jacobian


def _in_local_plates(posterior, site):
    return any(frame.name in posterior.local_plates for frame in site["cond_indep_stack"])


def fixed_subsamples(posterior, limit, shard=None):
    """:func:`_subsamples` as a list, the same at every call (and on every rank of a data-parallel fit)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return list(_subsamples(posterior, limit, shard))


def _subsamples(posterior, limit, shard=None):
    """Index sets covering every item of the subsampled plate (None for a plate without subsampling),
    or only the items of ``shard`` (:class:`~vi_flows.data_parallel.Shard`), at most ``limit`` of them,
    in a random order."""
    if not posterior.subsampled:
        yield {}
        return
    ((plate, frame),) = posterior.subsampled.items()  # one at most (LocalPosterior)
    items = torch.arange(frame.full_size) if shard is None else shard.items(frame.full_size)
    order = items[torch.randperm(len(items))]
    chunks = range(0, len(items), frame.size)
    for start in chunks if limit is None else chunks[:limit]:
        yield {plate: order[torch.arange(start, start + frame.size) % len(items)]}


def write_rows(posterior, name, indices, loc, precision):
    """Put one run's items' ``(a, beta)`` into their rows of the site's tables."""
    tables = posterior.pseudo_observations
    for table, value in ((attrgetter(name)(tables.locs), loc), (attrgetter(name)(tables.log_precisions), precision.log())):
        if not indices:
            table.copy_(value.expand_as(table))
            continue
        ((plate, index),) = indices.items()
        dim = table.dim() + posterior.subsampled[plate].dim - posterior.event_dims[name]
        table.index_copy_(dim, index.to(table.device), value.expand(table.shape[:dim] + (len(index),) + table.shape[dim + 1 :]))


def _fit_encoders(posterior, rows):
    """Each encoder's affine map by least squares from features to ``(a, log beta)`` per item, its
    features standardised by all the rows' spread."""
    encoders = posterior.pseudo_observations
    for plate in {encoders.plates[name] for name in posterior.names}:
        encoders.set_standardisation(plate, torch.cat([row[0][plate] for row in rows]))
    for name in posterior.names:
        plate = encoders.plates[name]
        features = torch.cat([encoders.standardise(plate, row[0][plate]) for row in rows])
        targets = torch.cat([torch.cat([row[1][name].reshape(len(row[0][plate]), -1), row[2][name].log().reshape(len(row[0][plate]), -1)], -1) for row in rows])
        design = torch.cat([features, torch.ones(len(features), 1)], -1)
        solution = torch.linalg.lstsq(design.double(), targets.double()).solution.to(features.dtype)
        affine = attrgetter(name)(encoders.encoders).affine
        affine.weight.copy_(solution[:-1].T)
        affine.bias.copy_(solution[-1])


def likelihood_laplace(posterior, global_values, indices, *args, **kwargs):
    """``({local site: a}, {local site: beta}, trace, indices)`` for the items of one model run (all, or
    the subsample ``indices`` give) at ``global_values``: the last run's trace, at the modes, and the
    subsample's indices."""
    with torch.no_grad(), poutine.block(), poutine.trace() as first:
        with LocalSampler(None, global_values, {}, indices):
            posterior.model(*args, **kwargs)
    indices = {plate: first.trace.nodes[plate]["value"] for plate in posterior.subsampled}
    unconstrained = {name: biject_to(posterior.supports[name]).inv(first.trace.nodes[name]["value"]).detach() for name in posterior.names}
    probes = {name: item_coordinate_probes(first.trace.nodes[name], unconstrained[name]) for name in posterior.names}
    for _ in range(NEWTON_STEPS):
        gradient, curvature, trace = local_derivatives(posterior, global_values, unconstrained, probes, indices, *args, **kwargs)
        step = {name: torch.where(curvature[name] < 0, -gradient[name] / curvature[name], 0.1 * gradient[name]).clamp(-2.0, 2.0) for name in posterior.names}
        unconstrained = {name: (unconstrained[name] + step[name]).nan_to_num() for name in posterior.names}
        if max(value.abs().max().item() for value in step.values()) < 1e-4:
            break
    gradient, curvature, trace = local_derivatives(posterior, global_values, unconstrained, probes, indices, *args, **kwargs)
    locs, precisions = {}, {}
    for name in posterior.names:
        prior_loc, prior_scale = gaussian_prior(trace.nodes[name]["fn"]) or (torch.zeros(()), torch.full((), float("inf")))
        prior_precision = prior_scale.pow(-2)
        total = (-curvature[name]).nan_to_num(nan=0.0)
        precision = torch.maximum(total - prior_precision, MIN_PRECISION_SHARE * prior_precision.clamp(min=1.0))
        # The likelihood's own slope at the expansion point: exact for a Gaussian likelihood wherever
        # the Newton steps stopped (an item far from its data may not have reached its mode).
        slope = gradient[name] + prior_precision * (unconstrained[name] - prior_loc)
        locs[name] = (unconstrained[name] + slope / precision).detach()
        precisions[name] = precision.detach()
    return locs, precisions, trace, indices


def local_derivatives(posterior, global_values, unconstrained, probes, indices, *args, num_draws=None, **kwargs):
    """Gradient and diagonal curvature of the model's unscaled log joint in each local coordinate;
    ``probes[site]`` are :func:`item_coordinate_probes`, one Hessian-vector product each. With
    ``num_draws``, the globals' and locals' values carry that many draws left of the model's plates."""
    with torch.enable_grad():
        leaves = {name: value.clone().requires_grad_() for name, value in unconstrained.items()}
        constrained, log_jacobian = {}, 0.0
        for name, leaf in leaves.items():
            transform = biject_to(posterior.supports[name])
            constrained[name] = transform(leaf)
            log_jacobian = log_jacobian + transform.log_abs_det_jacobian(leaf, constrained[name]).sum()
        with poutine.block(), draws_plate(posterior, num_draws), poutine.trace() as capture, LocalSampler(None, global_values, constrained, indices):
            posterior.model(*args, **kwargs)
        total = log_jacobian + sum(_unscaled_log_prob(site) for site in capture.trace.nodes.values() if _counts(site))
        gradients = dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()), create_graph=True)))
        curvature = {}
        for name, leaf in leaves.items():
            curvature[name] = torch.zeros_like(leaf)
            for probe in probes[name]:
                (column,) = torch.autograd.grad((gradients[name] * probe).sum(), leaf, retain_graph=True, allow_unused=True)
                if column is not None:
                    curvature[name] += probe * column.detach()
    return {name: g.detach() for name, g in gradients.items()}, curvature, capture.trace


def draws_plate(posterior, num_draws):
    """A plate of ``num_draws`` draws left of the model's plates (inside ``poutine.block``, which
    would hide the model's sites from it); nothing for None."""
    return contextlib.nullcontext() if num_draws is None else pyro.plate("_draws", num_draws, dim=-posterior.plate_depth - 1)


def item_coordinate_probes(site, unconstrained):
    """0/1 tensors shaped like a local site's unconstrained value, one per coordinate of an item (its
    dimensions outside the site's plates), each one at that coordinate of every item: the items are
    independent given the globals, so one Hessian-vector product with a probe reads that coordinate's
    diagonal curvature in every item at once, where a product with all ones would add in the
    cross-terms within an item and between sites."""
    event_dim = biject_to(site["fn"].support).domain.event_dim
    batch_dims = unconstrained.dim() - event_dim
    plate_dims = {batch_dims + frame.dim for frame in site["cond_indep_stack"] if batch_dims + frame.dim >= 0}
    inner = [dim for dim in range(unconstrained.dim()) if dim not in plate_dims]
    probes = []
    for coordinate in itertools.product(*(range(unconstrained.shape[dim]) for dim in inner)):
        probe = torch.zeros_like(unconstrained)
        index = [slice(None)] * unconstrained.dim()
        for dim, position in zip(inner, coordinate):
            index[dim] = position
        probe[tuple(index)] = 1.0
        probes.append(probe)
    return probes


def _counts(site):
    return site["type"] == "sample" and not site_is_subsample(site)


def _unscaled_log_prob(site):
    # Without the plates' subsampling scale: each item's own terms, whatever the subsample's size.
    log_prob = site["fn"].log_prob(site["value"])
    if site["mask"] is not None:
        log_prob = log_prob * site["mask"]
    return log_prob.sum()
