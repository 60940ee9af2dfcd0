"""The optimum of ``AutoFlow``'s per-item Gaussian family on a Poisson hierarchy, in float64:

    loc ~ N(0, loc_scale^2),  z_i | loc ~ N(loc, prior_sd^2),  count_i | z_i ~ Poisson(exp(z_i)),

(``rate_i = exp(z_i)``, a LogNormal). Not the exact posterior: the target of a variational fit whose
items' posteriors are Gaussian in log-rate. Given loc, item i's best Gaussian ``N(m, v)`` maximises
``E[count z - e^z] - log count! - KL(N(m, v) || N(loc, prior_sd^2))``, with ``E[e^z] = e^(m + v/2)``
in closed form; the globals' density is then ``exp`` of the items' best ELBOs and loc's prior, on a
grid (where loc's posterior sd is far below the items', sharing their Gaussians over loc's draws
changes nothing that matters).
"""

import pyro
import pyro.distributions as dist
import torch

PRIOR_SD, LOC_SCALE = 0.5, 1.0


def hierarchy(counts, subsample_size=None):
    """The model of the module's docstring, its groups in a plate that may be subsampled."""
    loc = pyro.sample("loc", dist.Normal(0.0, LOC_SCALE))
    with pyro.plate("groups", len(counts), subsample_size=subsample_size) as index:
        rate = pyro.sample("rate", dist.LogNormal(loc, PRIOR_SD))
        pyro.sample("count", dist.Poisson(rate), obs=counts[index])


def simulate(num_groups, seed=0):
    """Counts of ``num_groups`` groups whose log-rates are 0.5 + PRIOR_SD * N(0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.poisson(torch.exp(0.5 + PRIOR_SD * torch.randn(num_groups, generator=generator)), generator=generator)


def best_gaussian(count, loc, prior_sd=PRIOR_SD, iterations=200):
    """``(elbo, mean, var)`` of each item's best Gaussian over its log-rate (broadcast over ``count``
    and ``loc``). At the optimum ``v = 1 / (E[e^z] + 1/s^2)`` and ``count - E[e^z] - (m - loc)/s^2 = 0``:
    iterated, a Newton step in ``m`` (the objective is concave in it) after each update of ``v``."""
    count, loc = (torch.as_tensor(value, dtype=torch.float64) for value in (count, loc))
    prior_precision = prior_sd**-2
    mean, var = torch.broadcast_tensors(torch.log(count + 0.5) + 0 * loc, torch.tensor(prior_sd**2 / 2, dtype=torch.float64))
    for _ in range(iterations):
        expected = (mean + var / 2).exp()
        mean = mean + (count - expected - (mean - loc) * prior_precision) / (expected + prior_precision)
        var = 1 / ((mean + var / 2).exp() + prior_precision)
    kl = 0.5 * ((var + (mean - loc) ** 2) * prior_precision - 1 - torch.log(var * prior_precision))
    return count * mean - (mean + var / 2).exp() - torch.lgamma(count + 1) - kl, mean, var


def collapsed_optimum(counts, grid, prior_sd=PRIOR_SD, loc_scale=LOC_SCALE):
    """``(mean, sd)`` of loc under ``exp(sum of the items' best ELBOs + log prior)`` on ``grid``."""
    grid = torch.as_tensor(grid, dtype=torch.float64)
    values, multiplicity = torch.as_tensor(counts).unique(return_counts=True)  # a few distinct counts
    log_density = sum(number * best_gaussian(value, grid, prior_sd)[0] for value, number in zip(values, multiplicity))
    log_density = log_density - 0.5 * (grid / loc_scale) ** 2
    weights = (log_density - log_density.max()).exp()
    weights = weights / weights.sum()
    mean = (weights * grid).sum()
    return mean, (weights * (grid - mean) ** 2).sum().sqrt()
