"""Diagnostics on cases with known answers."""

import math

import pyro
import pyro.distributions as dist
import torch

from vi_flows.diagnostics import (
    elbo_estimate,
    iw_elbo,
    khat_reading,
    log_importance_weights,
    moment_errors,
    psis_khat,
    wasserstein_1d,
    worst_moment_errors,
)


def test_moment_errors_of_shifted_and_scaled_draws():
    draws = {"a": 3.0 + 2.0 * torch.randn(200000, 2), "b": torch.randn(200000)}
    reference = {"a": (torch.tensor([3.0, 2.0]), torch.tensor([2.0, 2.0])), "b": (torch.tensor(0.0), torch.tensor(0.5))}
    errors = moment_errors(draws, reference)
    torch.testing.assert_close(errors["a"][0], torch.tensor([0.0, 0.5]), atol=0.02, rtol=0)
    torch.testing.assert_close(errors["a"][1], torch.tensor([1.0, 1.0]), atol=0.02, rtol=0)
    torch.testing.assert_close(errors["b"][1], torch.tensor(2.0), atol=0.02, rtol=0)
    worst_mean, worst_sd = worst_moment_errors(errors)
    assert abs(worst_mean - 0.5) < 0.02 and abs(worst_sd - 1.0) < 0.03


def test_elbo_of_the_exact_posterior_is_log_z_with_zero_spread():
    """q = p: every log weight equals log Z, here log of the normaliser of 3 * N(0, 1)."""

    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.factor("constant", torch.tensor(math.log(3.0)).expand(x.shape))

    def guide():
        pyro.sample("x", dist.Normal(0.0, 1.0))

    value, error = elbo_estimate(log_importance_weights(model, guide, num_samples=1000))
    assert abs(value - math.log(3.0)) < 1e-5 and error < 1e-5


def _log_weights_of_normal_guide(guide_scale, num_samples=4000):
    """Target N(0, 1) with log Z = 0; guide N(0, guide_scale)."""
    draws = guide_scale * torch.randn(num_samples, generator=torch.Generator().manual_seed(0))
    return dist.Normal(0.0, 1.0).log_prob(draws) - dist.Normal(0.0, guide_scale).log_prob(draws)


def test_khat_is_small_for_the_exact_guide_and_large_for_a_narrow_one():
    assert psis_khat(_log_weights_of_normal_guide(1.0)) < 0.5
    assert psis_khat(_log_weights_of_normal_guide(1.2)) < 0.5  # a wider guide is a safe proposal
    assert psis_khat(_log_weights_of_normal_guide(0.4)) > 0.7
    assert khat_reading(0.3) == "good" and khat_reading(0.6) == "usable" and khat_reading(0.9) == "do not trust"


def test_iw_elbo_increases_with_draws_and_approaches_log_z():
    log_weights = _log_weights_of_normal_guide(0.7, num_samples=100000)
    elbo = log_weights.mean().item()
    bounds = [sum(iw_elbo(chunk) for chunk in log_weights.split(k)) / (100000 // k) for k in (1, 10, 100, 10000)]
    assert abs(bounds[0] - elbo) < 1e-5
    assert all(a < b for a, b in zip(bounds, bounds[1:]))
    assert elbo < -0.05 and abs(bounds[-1]) < 0.01


def test_wasserstein_of_a_shift_is_the_shift():
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(50000, 2, generator=generator)
    b = torch.randn(40000, 2, generator=generator) + torch.tensor([0.0, 0.7])
    distance = wasserstein_1d(a, b)
    assert distance[0] < 0.03 and abs(distance[1] - 0.7) < 0.03


def test_khat_near_a_threshold_is_taken_from_more_draws():
    """Log weights of a Pareto tail with index k: a k-hat within 0.1 of 0.5 or 0.7 is taken again
    from four times the draws, and its reading then varies less from one set of draws to the next."""
    from vi_flows.diagnostics import stable_khat

    def pareto(k, generator):
        return lambda num: -k * torch.rand(num, generator=generator, dtype=torch.float64).log()

    generator = torch.Generator().manual_seed(0)
    far, draws_far = stable_khat(pareto(0.2, generator), 4096)
    assert draws_far == 4096 and abs(far - 0.2) < 0.1
    readings, pooled = {"once": [], "stable": []}, []
    for seed in range(20):
        generator.manual_seed(seed)
        readings["once"].append(khat_reading(psis_khat(pareto(0.68, generator)(1024))))
        generator.manual_seed(seed)
        khat, draws = stable_khat(pareto(0.68, generator), 1024)
        pooled.append(draws == 4096)
        readings["stable"].append(khat_reading(khat))
    flips = {name: min(values.count(reading) for reading in set(values)) for name, values in readings.items()}
    assert sum(pooled) >= 10 and flips["stable"] < flips["once"], (readings, pooled)
