r"""Each item's marginal likelihood under a model whose latents are all local, by importance sampling
from the guide (Burda, Grosse & Salakhutdinov 2016; the test log-likelihood of VAE papers).

With every latent in one plate of items, the items are independent under model and guide alike, so
:math:`\log p(x_i) = \log E_{q(z_i \mid x_i)}[p(x_i, z_i)/q(z_i \mid x_i)]`, estimated from :math:`K` draws
:math:`w_{ik} = \log p(x_i, z_{ik}) - \log q(z_{ik} \mid x_i)` as :math:`\log \frac1K \sum_k e^{w_{ik}}`
(a lower bound in expectation, tight as :math:`K` grows), next to the ELBO :math:`\frac1K\sum_k w_{ik}`
and its two parts, the expected log-likelihood ("reconstruction") and the KL from the prior.
"""

import math
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from .diagnostics import psis_khats
from .pyro_internals import setup


@dataclass
class ItemScores:
    """Per item, each ``(items,)``: the importance-sampled ``log_likelihood`` and its Monte Carlo
    ``standard_error`` (delta method, which holds where ``khat``, the weights' PSIS k-hat, is below
    0.7), the ``elbo`` and its ``reconstruction`` and ``kl`` parts."""

    log_likelihood: torch.Tensor
    standard_error: torch.Tensor
    elbo: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor
    khat: torch.Tensor


@torch.no_grad()
def item_scores(model, guide, *args, num_samples=1000, chunk_size=250, **kwargs):
    """:class:`ItemScores` of every item of the model run ``model(*args, **kwargs)`` (one subsample,
    or all items without subsampling), from ``num_samples`` draws of the guide per item, taken
    ``chunk_size`` at a time. ``guide`` is an ``AutoFlow`` whose latents are all local, in one plate."""
    plate = _item_plate(setup(guide, *args, **kwargs))
    depth = guide.locals.plate_depth
    log_weights, log_likelihoods = [], []
    for start in range(0, num_samples, chunk_size):
        size = min(chunk_size, num_samples - start)
        with pyro.plate("_draws", size, dim=-depth - 1):
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        latent = _per_item(model_trace, plate, depth, observed=False) - _per_item(guide_trace, plate, depth, observed=False)
        log_likelihoods.append(_per_item(model_trace, plate, depth, observed=True))
        log_weights.append(latent + log_likelihoods[-1])
    log_weights, log_likelihoods = torch.cat(log_weights), torch.cat(log_likelihoods)
    log_mean = torch.logsumexp(log_weights, 0) - math.log(num_samples)
    # Delta method: sd of the weights over their mean, each relative to the largest, over sqrt(K).
    relative = (log_weights - log_weights.max(0).values).exp()
    standard_error = relative.std(0) / relative.mean(0) / math.sqrt(num_samples)
    elbo, reconstruction = log_weights.mean(0), log_likelihoods.mean(0)
    return ItemScores(log_mean, standard_error, elbo, reconstruction, reconstruction - elbo, psis_khats(log_weights))


def _item_plate(guide):
    """The one plate that holds every latent of ``guide``'s model, or a ``ValueError`` saying why not."""
    local = getattr(guide, "locals", None)
    if local is None or guide.latent_dim:
        raise ValueError(
            "item_scores needs a model whose latents are all local (in a plate of items that holds data), so that "
            "each item's likelihood is its own; this guide has global latents"
        )
    if len(local.local_plates) != 1:
        raise ValueError(f"item_scores reads one plate of items; the latents lie in plates {sorted(local.local_plates)}")
    (plate,) = local.local_plates
    return plate


def _per_item(trace, plate, depth, observed):
    """``(draws, items)``: each item's log density summed over the trace's observed (or latent) sites."""
    total = 0.0
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site) or site["is_observed"] != observed:
            continue
        frame = next((frame for frame in site["cond_indep_stack"] if frame.name == plate), None)
        if frame is None:
            raise ValueError(f"site {name!r} lies outside plate {plate!r}, so its density is not one item's")
        log_prob = site["fn"].log_prob(site["value"])
        if site["mask"] is not None:
            log_prob = log_prob * site["mask"]
        log_prob = log_prob.reshape((1,) * (depth + 1 - log_prob.dim()) + log_prob.shape)
        log_prob = log_prob.movedim(depth + 1 + frame.dim, 1)
        total = total + log_prob.reshape(log_prob.shape[:2] + (-1,)).sum(-1)
    return total
