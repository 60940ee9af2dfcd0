"""Export a fitted guide's posterior to ArviZ ``InferenceData`` (ArviZ's ``from_pyro`` takes MCMC only)."""

from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.importance import vectorized_importance_weights
from pyro.poutine.util import site_is_subsample

from .autoflow.sites import local_subsampled_plate
from .item_chunks import Stitched, chunked_traces, per_draw_log_density, plate_axis
from .particles import PARTICLE_PLATE, choose, guide_site_shapes
from .pyro_internals import max_plate_nesting


def _dims(name, shape, event_dim, frames, plate_sizes, every_item):
    """ArviZ dimension names of a site: a plate's name on the axis it indexes, ``<site>_dim_<k>``
    elsewhere; a subsampled plate's size is its full size where the export holds ``every_item``."""
    batch_dim = len(shape) - event_dim
    names = [f"{name}_dim_{axis}" for axis in range(len(shape))]
    for frame in frames:
        if frame.vectorized and frame.name != PARTICLE_PLATE:
            names[batch_dim + frame.dim] = frame.name
            plate_sizes[frame.name] = (frame.full_size or frame.size) if every_item else frame.size
    return names


def _is_deterministic(site):
    """A ``pyro.deterministic`` site, or a value ``poutine.reparam`` computes (the centred ``x`` of a
    non-centred model): Pyro records both as observed, with a point mass masked out of the density."""
    fn = site["fn"]
    return isinstance(fn, dist.MaskedDistribution) and fn._mask is False and isinstance(fn.base_dist, dist.Delta)


@torch.no_grad()
def to_inference_data(guide: Callable, model: Callable, *args, num_samples: int = 1000, **kwargs) -> "arviz.InferenceData":  # noqa: F821
    """Draw ``num_samples`` from ``guide`` and return an ``arviz.InferenceData`` with groups

    - ``posterior``: every latent site in the model's constrained space, and every deterministic
      one (``pyro.deterministic``, or computed by ``poutine.reparam``), with a plate's name as the
      dimension of its axis;
    - ``sample_stats``: ``log_p`` (model log joint), ``log_q`` (guide log density) and
      ``log_weight = log_p - log_q`` of each draw (the importance ratios behind PSIS k-hat);
    - ``log_likelihood``: the pointwise log likelihood of each observed site, so ``az.loo`` works;
    - ``observed_data``.

    One chain of ``num_samples`` draws. Model and guide run once, vectorised over the draws (as in
    Pyro's vectorised ELBO); a model written for one draw (``X @ w``) runs once per draw, as ``fit``
    finds (:mod:`~vi_flows.particles`). Where an ``AutoFlow``'s local posteriors' plate is subsampled,
    they run a subsample at a time over every item, the globals' draws fixed
    (:mod:`~vi_flows.item_chunks`): memory follows the subsample.
    """
    import arviz

    nesting = max_plate_nesting(model, guide, *args, **kwargs)
    posterior_shapes = {name: site["value"].shape for name, site in guide.prototype_trace.iter_stochastic_nodes()}
    # Deterministic sites are functions of the latents: they join the posterior, with their shapes
    # from one model run on one guide draw (the guide's prototype leaves them out, as observed).
    single_run = poutine.trace(poutine.replay(model, trace=poutine.trace(guide).get_trace(*args, **kwargs))).get_trace(*args, **kwargs)
    local = getattr(guide, "locals", None)
    subsampled = local_subsampled_plate(single_run, local.local_plates) if local is not None else {}
    if local is not None:
        posterior_shapes.update(local.full_shapes)
    if subsampled:
        ((_, frame),) = subsampled.items()
        values, pointwise, sites, log_p, log_q = _over_subsamples(guide, model, frame, nesting, num_samples, args, kwargs)
    elif _broadcasts(model, guide, nesting, args, kwargs):
        values, pointwise, sites, log_p, log_q = _in_one_run(guide, model, nesting, num_samples, args, kwargs)
    else:
        values, pointwise, sites, log_p, log_q = _draw_by_draw(guide, model, nesting, num_samples, args, kwargs)
    for name, site in single_run.nodes.items():
        if site["type"] == "sample" and _is_deterministic(site):
            posterior_shapes[name] = values[name].shape[values[name].dim() - site["value"].dim() :]
    posterior, log_likelihood, observed, dims, plate_sizes = {}, {}, {}, {}, {}
    for name, site in sites.items():
        if name in posterior_shapes:
            shape = posterior_shapes[name]
            posterior[name] = values[name].reshape((1, num_samples) + shape).cpu().numpy()
        elif site["is_observed"]:
            shape = values[name].shape
            event_dim = site["fn"].event_dim  # a pointwise log likelihood has the batch shape only
            log_likelihood[name] = pointwise[name].reshape((1, num_samples) + shape[: len(shape) - event_dim]).cpu().numpy()
            observed[name] = values[name].cpu().numpy()
            if event_dim:  # the two groups' shapes differ: ArviZ names their axes itself
                continue
        else:
            continue
        dims[name] = _dims(name, shape, site["fn"].event_dim, site["cond_indep_stack"], plate_sizes, bool(subsampled))
    stats = {"log_p": log_p.reshape(1, -1).cpu().numpy(), "log_q": log_q.reshape(1, -1).cpu().numpy(), "log_weight": (log_p - log_q).reshape(1, -1).cpu().numpy()}
    coords = {name: list(range(size)) for name, size in plate_sizes.items()}
    return arviz.from_dict(
        posterior=posterior,
        sample_stats=stats,
        log_likelihood=log_likelihood or None,
        observed_data=observed or None,
        coords=coords,
        dims=dims,
    )


def _broadcasts(model, guide, nesting, args, kwargs):
    """Whether ``model`` broadcasts over a leading dimension of draws, as ``fit`` finds (the
    caller's random state kept: the draws are the same however the model is written)."""
    with torch.random.fork_rng():
        return choose(model, guide, 2, nesting, *args, **kwargs).mode == "broadcast"


def _in_one_run(guide, model, nesting, num_samples, args, kwargs):
    """``(values, pointwise log-likelihoods, sites, log_p, log_q)`` of one run of model and guide
    vectorised over the draws (Pyro's importance sampler)."""
    log_weights, model_trace, guide_trace = vectorized_importance_weights(
        model, guide, *args, num_samples=num_samples, max_plate_nesting=nesting, normalized=False, **kwargs
    )
    log_q = _per_draw(guide_trace, num_samples)
    sites = {name: site for name, site in model_trace.nodes.items() if site["type"] == "sample"}
    values = {name: site["value"] for name, site in sites.items()}
    pointwise = {name: site["log_prob"] for name, site in sites.items() if site["is_observed"]}
    return values, pointwise, sites, log_weights + log_q, log_q


def _per_draw(trace, num_samples):
    """The log density of each draw in a trace vectorised over ``num_samples`` draws."""
    return sum(site["log_prob"].reshape(num_samples, -1).sum(-1) for site in trace.nodes.values() if site["type"] == "sample")


def _draw_by_draw(guide, model, nesting, num_samples, args, kwargs):
    """:func:`_in_one_run`'s results for a model that does not broadcast over draws: the guide's
    draws taken at once, the model run on each of them, its sites' values and log densities stacked."""
    with pyro.plate(PARTICLE_PLATE, num_samples, dim=-(nesting + 1)):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    guide_trace.compute_log_prob()
    log_q = _per_draw(guide_trace, num_samples)
    draws = {name: guide_trace.nodes[name]["value"].reshape((num_samples,) + shape) for name, shape in guide_site_shapes(guide, *args, **kwargs).items()}
    runs = [poutine.trace(poutine.condition(model, data={name: value[i] for name, value in draws.items()})).get_trace(*args, **kwargs) for i in range(num_samples)]
    for run in runs:
        run.compute_log_prob()
    sites = {name: site for name, site in runs[0].nodes.items() if site["type"] == "sample"}

    def stacked(name, key):
        return torch.stack([run.nodes[name][key] for run in runs])

    data = {name for name, site in sites.items() if site["is_observed"] and name not in draws and not _is_deterministic(site)}
    values = {name: site["value"] if name in data else stacked(name, "value") for name, site in sites.items()}
    pointwise = {name: stacked(name, "log_prob") for name in data}
    return values, pointwise, sites, torch.stack([run.log_prob_sum() for run in runs]), log_q


def _over_subsamples(guide, model, frame, nesting, num_samples, args, kwargs):
    """:func:`_in_one_run`'s results over every item of the subsampled plate ``frame``, a subsample
    at a time (:mod:`~vi_flows.item_chunks`); ``sites`` are the last run's."""
    values, pointwise, sites, log_p, log_q = Stitched(), Stitched(), {}, 0.0, 0.0
    runs = chunked_traces(guide, model, frame, num_samples, PARTICLE_PLATE, nesting, *args, **kwargs)
    for index, (guide_trace, model_trace, kept) in enumerate(runs):
        first = index == 0
        log_q = log_q + per_draw_log_density(guide_trace, frame, kept, first, num_samples)
        log_p = log_p + per_draw_log_density(model_trace, frame, kept, first, num_samples)
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            axis = plate_axis(site, frame)
            values.add(name, site["value"], None if axis is None else axis + site["fn"].event_dim, kept, first)
            if site["is_observed"]:
                unscaled = site["log_prob"] * (frame.size / frame.full_size if axis is not None else 1.0)
                pointwise.add(name, unscaled, axis, kept, first)
            sites[name] = site
    return values.result(), pointwise.result(), sites, log_p, log_q
