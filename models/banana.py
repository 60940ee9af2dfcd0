"""The 2-D banana: x1 ~ N(0, 10), x2 | x1 ~ N(0.1 (x1^2 - 100), 1)."""

import pyro
import pyro.distributions as dist
import torch

DESCRIPTION = "2-D banana x1 ~ N(0, 10), x2 | x1 ~ N(0.1 (x1^2 - 100), 1) (exact; log Z = 0)"
LOG_Z = 0.0


def model():
    x1 = pyro.sample("x1", dist.Normal(0.0, 10.0))
    pyro.sample("x2", dist.Normal(0.1 * (x1**2 - 100), 1.0))


def sample_posterior(num_samples):
    x1 = dist.Normal(0.0, 10.0).sample((num_samples,))
    return {"x1": x1, "x2": dist.Normal(0.1 * (x1**2 - 100), 1.0).sample()}


def posterior_moments():
    """Exact ``{site: (mean, sd)}``: Var(x2) = 1 + 0.01 Var(x1^2) = 1 + 0.01 * 2 * 10^4."""
    return {"x1": (torch.tensor(0.0), torch.tensor(10.0)), "x2": (torch.tensor(0.0), torch.tensor(201.0).sqrt())}
