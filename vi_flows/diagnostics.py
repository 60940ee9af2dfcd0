"""Diagnostics of a fitted guide: pure functions of log importance weights, plus the sampler of them."""

import math

import pyro.poutine as poutine
import torch
from pyro.infer.importance import vectorized_importance_weights


def _max_plate_nesting(model, guide, *args, **kwargs):
    """How many vectorised plates deep the model goes, read off one guide-replayed model trace."""
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, guide_trace)).get_trace(*args, **kwargs)
    depths = [
        -frame.dim
        for site in model_trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(depths, default=0)


@torch.no_grad()
def log_importance_weights(model, guide, *args, num_samples=4096, **kwargs):
    """Draw ``num_samples`` from ``guide`` and return ``log p(x, theta) - log q(theta)`` per draw.

    Uses Pyro's vectorised importance sampler, so model and guide run once for all draws.
    """
    nesting = _max_plate_nesting(model, guide, *args, **kwargs)
    log_weights, _, _ = vectorized_importance_weights(
        model, guide, *args, num_samples=num_samples, max_plate_nesting=nesting, normalized=False, **kwargs
    )
    return log_weights


def elbo_estimate(log_weights):
    """The ELBO (mean log weight) and its Monte Carlo standard error, as floats."""
    return log_weights.mean().item(), (log_weights.std() / math.sqrt(log_weights.numel())).item()
