"""Curved per-item posteriors: a global mean, and in a plate of items a banana each."""

import math

import pyro
import pyro.distributions as dist
import torch

DESCRIPTION = "8 items, each z ~ N((mu, mu), I), y ~ N(z2 - z1^2, 0.3): a banana per item (log Z by quadrature)"
NOISE = 0.3
DATA = torch.ones(8)


def model(data=DATA):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("items", len(data)):
        z = pyro.sample("z", dist.Normal(torch.stack([mu, mu], -1), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(z[..., 1] - z[..., 0] ** 2, NOISE), obs=data)


def log_evidence(data):
    """``log p(data)`` by quadrature in float64: given z1, y + z1^2 ~ N(mu, 1 + NOISE^2) with z2
    integrated out, leaving one dimension per item and one for ``mu``."""
    grid, mus = torch.linspace(-8.0, 8.0, 1601, dtype=torch.float64), torch.linspace(-6.0, 6.0, 481, dtype=torch.float64)
    z1, mu = grid[:, None, None], mus[None, :, None]
    per_item = dist.Normal(mu, 1.0).log_prob(z1) + dist.Normal(mu, math.sqrt(1.0 + NOISE**2)).log_prob(data.double() + z1**2)
    log_items = (torch.logsumexp(per_item, 0) + math.log(grid[1] - grid[0])).sum(-1)
    joint = dist.Normal(0.0, 1.0).log_prob(mus) + log_items
    return (torch.logsumexp(joint, 0) + math.log(mus[1] - mus[0])).item()


LOG_Z = log_evidence(DATA)
