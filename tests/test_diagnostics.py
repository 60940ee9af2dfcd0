"""Diagnostics on cases with known answers."""

import math

import pyro
import pyro.distributions as dist
import torch

from vi_flows.diagnostics import elbo_estimate, log_importance_weights, moment_errors, worst_moment_errors


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
