r"""How noisy a subsampled fit's steps are for the globals, in posterior sds.

A step on a subsample of B of N items estimates the items' share of the ELBO's gradient as N / B
times the subsample's: its noise grows as :math:`\sqrt{N / B}`, while the posterior's sds shrink as
:math:`1 / \sqrt{N}`. Measured in the posterior's sd, the noise of one step's slope in a global
coordinate is about :math:`\sqrt{N / B}` times a model constant, and Adam's iterates under it
wander and settle with their scales too small: on ``benchmarks/local_scale.py``'s hierarchy (B = 256)
the noise is 7, 12, 21 and 68 at N = 10^4, 3 x 10^4, 10^5 and 10^6, and the default fit's globals
ended up to 0.16, 0.34, 0.72 and 1.24 posterior sds off (two seeds; one at 10^5), tau's sd at 0.42
of exact on one seed at 10^6 (RESULTS.md, "Local latents at scale").

:func:`subsample_noise` reads it off a guide with local posteriors: the sd, over subsamples, of the
slope of the collapsed log-likelihood (each item integrated out against its pseudo-observation,
:func:`~vi_flows.autoflow.local_initialization.collapsed_terms`) at the posterior mean of the globals,
times their posterior sd there.
"""

import torch

from .local_initialization import collapsed_terms

NUM_SUBSAMPLES = 32


def subsample_noise(guide, *args, num_subsamples=NUM_SUBSAMPLES, num_draws=1000, **kwargs):
    """Per coordinate of ``guide``'s global latent vector (unconstrained), the sd of one subsample's
    estimate of the collapsed log-likelihood's slope, times the posterior sd, at the posterior mean
    (of ``num_draws`` draws), over ``num_subsamples`` subsamples of the model run ``model(*args, **kwargs)``."""
    with torch.no_grad(), torch.random.fork_rng():
        draws = guide.get_posterior(*args, **kwargs).sample((num_draws,))
    terms = collapsed_terms(guide, *args, max_subsamples=num_subsamples, with_globals=False, **kwargs)
    slopes = []
    for term in terms:
        latent = draws.mean(0).requires_grad_()
        (slope,) = torch.autograd.grad(len(terms) * term(latent), latent)  # one subsample's estimate
        slopes.append(slope)
    return torch.stack(slopes).std(0) * draws.std(0)
