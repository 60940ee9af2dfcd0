"""An equal mixture of N((+3, 0), I) and N((-3, 0), I), written as an improper prior plus a factor."""

import math

import pyro
import pyro.distributions as dist
import torch

DESCRIPTION = "2-D equal mixture of N((+-3, 0), I) via ImproperUniform + pyro.factor (exact; log Z = 0)"
LOG_Z = 0.0
CENTRES = torch.tensor([[3.0, 0.0], [-3.0, 0.0]])


def log_density(x):
    components = dist.Normal(CENTRES.to(x), 1.0).log_prob(x.unsqueeze(-2)).sum(-1)
    return components.logsumexp(-1) - math.log(2)


def model():
    x = pyro.sample("x", dist.ImproperUniform(dist.constraints.real, (), (2,)))
    pyro.factor("mixture", log_density(x))


def sample_posterior(num_samples):
    centres = CENTRES[torch.randint(2, (num_samples,))]
    return {"x": centres + torch.randn(num_samples, 2)}


def posterior_moments():
    """Exact ``{site: (mean, sd)}``: Var(x_1) = 3^2 + 1 between and within the components."""
    return {"x": (torch.zeros(2), torch.tensor([10.0, 1.0]).sqrt())}
