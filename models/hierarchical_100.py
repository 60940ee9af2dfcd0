"""A hierarchical normal model with 100 groups: 102 latent dimensions."""

import pyro
import pyro.distributions as dist
import torch

from ._hierarchical import hierarchical_normal_moments

DESCRIPTION = "hierarchical normal, 100 groups x 4 observations (102 latent dimensions; NUTS reference)"
LOG_Z = None
NUM_GROUPS, PER_GROUP = 100, 4

_generator = torch.Generator().manual_seed(5)
_group_means = 1.0 + 0.8 * torch.randn(NUM_GROUPS, generator=_generator)
DATA = _group_means.unsqueeze(-1) + torch.randn(NUM_GROUPS, PER_GROUP, generator=_generator)


def model():
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(2.0))
    with pyro.plate("group", NUM_GROUPS):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        with pyro.plate("observation", PER_GROUP, dim=-2):
            pyro.sample("y", dist.Normal(theta, 1.0), obs=DATA.T)


def posterior_moments():
    """Exact ``{site: (mean, sd)}``, by quadrature over tau (``_hierarchical``): the group means are
    sufficient, each with sd 1/2. They agree with 2 x 5000 NUTS draws within 0.022 sd in every mean
    and 3% in every sd."""
    moments = hierarchical_normal_moments(DATA.mean(-1), torch.full((NUM_GROUPS,), PER_GROUP**-0.5), 5.0, lambda tau: -0.5 * (tau / 2.0) ** 2)
    return {name: (mean.float(), sd.float()) for name, (mean, sd) in moments.items()}
