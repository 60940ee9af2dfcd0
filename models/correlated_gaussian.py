"""A 20-D Gaussian whose coordinates all have correlation 0.95."""

import pyro
import pyro.distributions as dist
import torch

DESCRIPTION = "20-D Gaussian, every pair of coordinates correlated 0.95 (exact; log Z = 0)"
LOG_Z = 0.0
DIM = 20
CORRELATION = 0.95


def covariance(dim=DIM, correlation=CORRELATION):
    return (1 - correlation) * torch.eye(dim) + correlation * torch.ones(dim, dim)


def model():
    pyro.sample("x", dist.MultivariateNormal(torch.zeros(DIM), covariance()))


def sample_posterior(num_samples):
    return {"x": dist.MultivariateNormal(torch.zeros(DIM), covariance()).sample((num_samples,))}


def posterior_moments():
    """Exact ``{site: (mean, sd)}``: the prior is the posterior, with unit variances."""
    return {"x": (torch.zeros(DIM), covariance().diagonal().sqrt())}
