r"""How noisy a subsampled fit's steps are for the globals, in posterior sds.

A step on a subsample of B of N items estimates the items' share of the ELBO's gradient as N / B
times the subsample's: its noise grows as :math:`\sqrt{N / B}`, while the posterior's sds shrink as
:math:`1 / \sqrt{N}`. Measured in the posterior's sd, the noise of one step's slope in a global
coordinate is about :math:`\sqrt{N / B}` times a model constant, and Adam's iterates under it
wander and settle with their scales too small: on ``benchmarks/local_scale.py``'s hierarchy (B = 256)
the noise is 7, 12, 21 and 68 at N = 10^4, 3 x 10^4, 10^5 and 10^6, and fits without a control
variate ended with their globals up to 0.16, 0.34, 0.72 and 1.24 posterior sds off, tau's sd at 0.42
of exact on one seed at 10^6 (RESULTS.md, "Local latents at scale").

With a control variate (:mod:`~vi_flows.control_variates`, ``fit``'s default) a step's noise is
that of each item's slope less its row of the control variate's table, of the order of the draw's
distance from the anchor: it is measured at a few of the guide's draws (0.10-0.19 at the end of
the same fits, whose globals then ended within 0.04 sd at 10^4 and 10^5).

:func:`subsample_noise` reads it off a guide with local posteriors: the sd, over subsamples, of the
slope of the collapsed log-likelihood (each item integrated out against its pseudo-observation,
:mod:`~vi_flows.autoflow.item_slopes`) at a few of the guide's draws (their root mean square), less the
control variate's rows where given, times the globals' posterior sd.
"""

import torch

from .item_slopes import item_slopes, subsampled_plate
from .local_initialization import fixed_subsamples

NUM_SUBSAMPLES = 32
NUM_POINTS = 4


def subsample_noise(guide, *args, control_variate=None, num_subsamples=NUM_SUBSAMPLES, num_draws=1000, **kwargs):
    """Per coordinate of ``guide``'s global latent vector (unconstrained), the sd of one subsample's
    estimate of the collapsed log-likelihood's slope (less ``control_variate``'s, where given), times the
    posterior sd (of ``num_draws`` draws), over ``num_subsamples`` subsamples of the model run
    ``model(*args, **kwargs)``, at ``NUM_POINTS`` of the draws."""
    with torch.no_grad(), torch.random.fork_rng():
        draws = guide.get_posterior(*args, **kwargs).sample((num_draws,))
    plate, frame = subsampled_plate(guide)
    subsamples = fixed_subsamples(guide.locals, num_subsamples)
    variances = []
    for point in draws[:NUM_POINTS]:
        estimates = []
        for indices in subsamples:
            slopes = item_slopes(guide, point, indices, *args, **kwargs)
            if control_variate is not None:
                slopes = slopes - control_variate.slopes[indices[plate]]
            estimates.append(slopes.sum(0) * frame.full_size / frame.size)
        variances.append(torch.stack(estimates).var(0))
    return torch.stack(variances).mean(0).sqrt() * draws.std(0)
