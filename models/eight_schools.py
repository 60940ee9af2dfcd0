"""Eight schools (Rubin 1981), centred: the classic hierarchical model with a funnel-shaped posterior."""

import pyro
import pyro.distributions as dist
import torch

from ._hierarchical import hierarchical_normal_moments

DESCRIPTION = "eight schools, centred parametrisation (hierarchical, funnel in tau; NUTS reference)"
LOG_Z = None
EFFECTS = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
STANDARD_ERRORS = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def model():
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(EFFECTS)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, STANDARD_ERRORS), obs=EFFECTS)


def posterior_moments():
    """Exact ``{site: (mean, sd)}``, by quadrature over tau (``_hierarchical``); they agree with
    2 x 5000 NUTS draws of the non-centred model within 0.024 sd in every mean and 2% in every sd."""
    moments = hierarchical_normal_moments(EFFECTS, STANDARD_ERRORS, 5.0, lambda tau: -torch.log1p((tau / 5.0) ** 2))
    return {name: (mean.float(), sd.float()) for name, (mean, sd) in moments.items()}
