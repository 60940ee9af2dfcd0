"""Neal's funnel in 10 dimensions: y ~ N(0, 3), x_i | y ~ N(0, exp(y / 2)) for i = 1..9."""

import math

import pyro
import pyro.distributions as dist
import torch

DESCRIPTION = "Neal's funnel, 10-D: y ~ N(0, 3), x_1..9 ~ N(0, exp(y/2)) (exact; log Z = 0)"
LOG_Z = 0.0
NUM_X = 9


def model():
    y = pyro.sample("y", dist.Normal(0.0, 3.0))
    with pyro.plate("coordinates", NUM_X):
        pyro.sample("x", dist.Normal(0.0, (y / 2).exp()))


def sample_posterior(num_samples):
    y = dist.Normal(0.0, 3.0).sample((num_samples,))
    return {"y": y, "x": dist.Normal(0.0, (y / 2).exp().unsqueeze(-1)).expand((num_samples, NUM_X)).sample()}


def posterior_moments():
    """Exact ``{site: (mean, sd)}``: Var(x_i) = E[exp(y)] = exp(9 / 2), the log-normal mean.

    Sample moments of x converge slowly (its fourth moment is 3 exp(18)): the sd of 200000 exact
    draws is typically 10-25% off, hence the closed form."""
    x_sd = torch.full((NUM_X,), math.exp(9 / 4))
    return {"y": (torch.tensor(0.0), torch.tensor(3.0)), "x": (torch.zeros(NUM_X), x_sd)}
