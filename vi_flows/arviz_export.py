"""Export a fitted guide's posterior to ArviZ ``InferenceData`` (ArviZ's ``from_pyro`` takes MCMC only)."""

from typing import Callable

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.importance import vectorized_importance_weights

from .autoflow.sites import subsampled_plates
from .pyro_internals import max_plate_nesting

# The particle plate Pyro's vectorised importance sampler adds around model and guide.
_PARTICLE_PLATE = "num_particles_vectorized"


def _dims(name, shape, event_dim, frames, plate_sizes):
    """ArviZ dimension names of a site: a plate's name on the axis it indexes, ``<site>_dim_<k>`` elsewhere."""
    batch_dim = len(shape) - event_dim
    names = [f"{name}_dim_{axis}" for axis in range(len(shape))]
    for frame in frames:
        if frame.vectorized and frame.name != _PARTICLE_PLATE:
            names[batch_dim + frame.dim] = frame.name
            plate_sizes[frame.name] = frame.size
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
    Pyro's vectorised ELBO), so the model must broadcast over a leading particle dimension.
    """
    import arviz

    nesting = max_plate_nesting(model, guide, *args, **kwargs)
    log_weights, model_trace, guide_trace = vectorized_importance_weights(
        model, guide, *args, num_samples=num_samples, max_plate_nesting=nesting, normalized=False, **kwargs
    )
    log_q = sum(
        site["log_prob"].reshape(num_samples, -1).sum(-1)
        for site in guide_trace.nodes.values()
        if site["type"] == "sample"
    )
    posterior, log_likelihood, observed, dims, plate_sizes = {}, {}, {}, {}, {}
    posterior_shapes = {name: site["value"].shape for name, site in guide.prototype_trace.iter_stochastic_nodes()}
    local = getattr(guide, "locals", None)
    if local is not None:
        subsampled = subsampled_plates(model_trace)
        if subsampled:
            raise NotImplementedError(
                f"to_inference_data runs model and guide once on all the data; plate {', '.join(subsampled)} is "
                "subsampled. Export from a model without subsampling (the same guide reads it)."
            )
        posterior_shapes.update(local.full_shapes)
    # Deterministic sites are functions of the latents: they join the posterior, with their shapes
    # from one model run on one guide draw (the guide's prototype leaves them out, as observed).
    single_run = poutine.trace(poutine.replay(model, trace=poutine.trace(guide).get_trace(*args, **kwargs)))
    for name, site in single_run.get_trace(*args, **kwargs).nodes.items():
        if site["type"] == "sample" and _is_deterministic(site):
            posterior_shapes[name] = site["value"].shape
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if name in posterior_shapes:
            shape = posterior_shapes[name]
            posterior[name] = site["value"].reshape((1, num_samples) + shape).cpu().numpy()
        elif site["is_observed"]:
            shape = site["value"].shape
            event_dim = site["fn"].event_dim  # a pointwise log likelihood has the batch shape only
            log_likelihood[name] = site["log_prob"].reshape((1, num_samples) + shape[: len(shape) - event_dim]).cpu().numpy()
            observed[name] = site["value"].cpu().numpy()
            if event_dim:  # the two groups' shapes differ: ArviZ names their axes itself
                continue
        else:
            continue
        dims[name] = _dims(name, shape, site["fn"].event_dim, site["cond_indep_stack"], plate_sizes)
    stats = {
        "log_p": (log_weights + log_q).reshape(1, -1).cpu().numpy(),
        "log_q": log_q.reshape(1, -1).cpu().numpy(),
        "log_weight": log_weights.reshape(1, -1).cpu().numpy(),
    }
    coords = {name: list(range(size)) for name, size in plate_sizes.items()}
    return arviz.from_dict(
        posterior=posterior,
        sample_stats=stats,
        log_likelihood=log_likelihood or None,
        observed_data=observed or None,
        coords=coords,
        dims=dims,
    )
