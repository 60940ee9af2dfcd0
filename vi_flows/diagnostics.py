"""Diagnostics of a fitted guide: pure functions of draws and log importance weights, and the sampler of the latter."""

import math

import pyro
import torch

from .particles import choose, log_densities
from .pyro_internals import max_plate_nesting


@torch.no_grad()
def log_importance_weights(model, guide, *args, num_samples=4096, **kwargs):
    """Draw ``num_samples`` from ``guide`` and return ``log p(x, theta) - log q(theta)`` per draw.

    Model and guide run once for all draws where the model broadcasts over them, else as
    :func:`~vi_flows.particles.choose` finds (the model's log density mapped over the draws).
    """
    particles = choose(model, guide, num_samples, max_plate_nesting(model, guide, *args, **kwargs), *args, **kwargs)
    with pyro.validation_enabled(False):
        log_q, log_p = log_densities(model, guide, particles, *args, **kwargs)
    return log_p - log_q


def elbo_estimate(log_weights):
    """The ELBO (mean log weight) and its Monte Carlo standard error, as floats."""
    return log_weights.mean().item(), (log_weights.std() / math.sqrt(log_weights.numel())).item()


def moment_errors(draws, reference):
    """Per-element standardised mean error and sd ratio of ``draws`` against ``reference``.

    ``draws`` maps a site to a tensor of shape ``(num_draws, *site_shape)``, or to the draws' own
    ``(mean, sd)`` (:func:`vi_flows.guide_moments`, for more draws than fit in memory);
    ``reference`` maps a site to its exact ``(mean, sd)``. Returns
    ``{site: (|mean - ref_mean| / ref_sd, sd / ref_sd)}``.
    """
    result = {}
    for name, (mean, sd) in reference.items():
        values = draws[name]
        draw_mean, draw_sd = values if isinstance(values, tuple) else (values.mean(0), values.std(0))
        result[name] = ((draw_mean - mean).abs() / sd, draw_sd / sd)
    return result


def worst_moment_errors(errors):
    """The largest standardised mean error and the largest |sd ratio - 1| over all sites."""
    worst_mean = max(mean_error.max().item() for mean_error, _ in errors.values())
    worst_sd = max((sd_ratio - 1).abs().max().item() for _, sd_ratio in errors.values())
    return worst_mean, worst_sd


def iw_elbo(log_weights):
    """The importance-weighted bound log mean(exp(log w)) over all draws: a log-evidence estimate
    that tightens towards log Z as the number of draws grows (Burda et al., 2016)."""
    return (log_weights.logsumexp(0) - math.log(log_weights.shape[0])).item()


def psis_khat(log_weights):
    """Pareto k-hat of the importance ratios (Yao et al., 2018), from ArviZ's ``psislw``.

    Below 0.5 the guide is good as a proposal, 0.5-0.7 usable, above 0.7 not to be trusted.
    """
    return psis_khats(log_weights.unsqueeze(-1)).item()


def psis_khats(log_weights):
    """:func:`psis_khat` of each column of ``(draws, items)`` log weights, as a tensor ``(items,)``:
    each item's own, where the items are independent (:mod:`~vi_flows.item_likelihood`)."""
    import arviz

    # ArviZ reads one row per item; q = p gives constant weights, which its tail fit reports as inf.
    _, khats = arviz.psislw(log_weights.T.double().cpu().numpy())
    constant = (log_weights.max(0).values - log_weights.min(0).values) < 1e-9
    return torch.where(constant.cpu(), -math.inf, torch.as_tensor(khats, dtype=torch.float64).reshape(-1))


# The thresholds of khat_reading, and how close to one a k-hat must be for stable_khat to draw more.
KHAT_THRESHOLDS = (0.5, 0.7)
KHAT_MARGIN = 0.1


def stable_khat(draw_log_weights, num_draws, factor=4):
    """PSIS k-hat of ``draw_log_weights(num_draws)``, and how many draws it took. Within
    ``KHAT_MARGIN`` of a threshold of :func:`khat_reading`, where the reading of a few thousand draws
    flips from run to run (0.47-0.94 on equally good fits of the centred eight schools, RESULTS.md),
    it is taken again from ``factor - 1`` more sets of draws, pooled with the first."""
    log_weights = draw_log_weights(num_draws)
    khat = psis_khat(log_weights)
    if not any(abs(khat - threshold) < KHAT_MARGIN for threshold in KHAT_THRESHOLDS):
        return khat, log_weights.numel()
    pooled = torch.cat([log_weights, *(draw_log_weights(num_draws) for _ in range(factor - 1))])
    return psis_khat(pooled), pooled.numel()


def khat_reading(khat):
    """The usual reading of a k-hat value."""
    return "good" if khat < 0.5 else "usable" if khat < 0.7 else "do not trust"


def wasserstein_1d(draws, reference, num_quantiles=1000):
    """1-D Wasserstein distance between the marginals of two sets of draws, per element.

    ``draws`` and ``reference`` have shapes ``(N, *shape)`` and ``(M, *shape)``; W1 is the mean
    absolute difference of their quantile functions on a grid of ``num_quantiles`` levels.
    """
    levels = (torch.arange(num_quantiles, dtype=draws.dtype, device=draws.device) + 0.5) / num_quantiles
    ours = torch.quantile(draws.reshape(draws.shape[0], -1), levels, dim=0)
    theirs = torch.quantile(reference.reshape(reference.shape[0], -1).to(draws), levels, dim=0)
    return (ours - theirs).abs().mean(0).reshape(draws.shape[1:])
