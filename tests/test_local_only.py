"""Models whose latents are all local (a VAE's shape): their per-item posteriors against a closed form,
what a guide does with them, and each item's importance-sampled likelihood against a known answer."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Predictive

from vi_flows import AutoFlow, fit, sample_constrained
from vi_flows.item_likelihood import item_scores

NOISE = 0.5
# A linear Gaussian VAE's decoder, fixed: x = W z + b + noise, so p(x) = N(b, W W^T + NOISE^2 I).
WEIGHT = torch.tensor([[1.0, 0.5], [-0.3, 0.8], [0.2, -1.2]])
BIAS = torch.tensor([0.5, -1.0, 0.0])


def linear_gaussian_vae(data, subsample_size=None):
    with pyro.plate("items", len(data), subsample_size=subsample_size) as index:
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ WEIGHT.T + BIAS, NOISE).to_event(1), obs=data[index])


def linear_gaussian_data(num_items, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_items, 2, generator=generator) @ WEIGHT.T + BIAS + NOISE * torch.randn(num_items, 3, generator=generator)


def exact_posterior(data):
    """``(means (items, 2), covariance (2, 2))`` of each item's z."""
    precision = torch.eye(2) + WEIGHT.T @ WEIGHT / NOISE**2
    covariance = torch.linalg.inv(precision)
    return (data - BIAS) @ WEIGHT @ covariance / NOISE**2, covariance


def exact_log_likelihood(data):
    marginal = dist.MultivariateNormal(BIAS, WEIGHT @ WEIGHT.T + NOISE**2 * torch.eye(3))
    return marginal.log_prob(data)


@pytest.mark.parametrize("local", ["per-item", "amortized"])
def test_a_model_of_local_latents_only_gets_each_items_posterior(fresh_param_store, local):
    data = linear_gaussian_data(200)
    guide = AutoFlow(linear_gaussian_vae, local=local)
    fit(linear_gaussian_vae, guide, data, 50, num_steps=300, num_particles=8, progress=False, seed=0)
    assert guide.latent_dim == 0 and guide.local_sites == ("z",)
    means, covariance = exact_posterior(data)
    draws = sample_constrained(guide, 4000, data, 50)["z"]
    assert draws.shape == (4000, 200, 2)
    # Conjugate, and W's columns nearly orthogonal (posterior correlation 0.01): each item's diagonal Gaussian is exact.
    sds = covariance.diagonal().sqrt()
    assert ((draws.mean(0) - means).abs() / sds).max() < 0.1
    assert ((draws.std(0) / sds - 1).abs()).max() < 0.1
    assert guide.median(data, 50)["z"].shape == (200, 2)
    assert guide.quantiles([0.1, 0.9], data, 50)["z"].shape == (2, 200, 2)
    predictive = Predictive(linear_gaussian_vae, guide=guide, num_samples=3)(data, 50)
    assert predictive["x"].shape == (3, 50, 3)


def test_importance_sampled_likelihoods_match_a_linear_gaussian_vae(fresh_param_store):
    data = linear_gaussian_data(40, seed=1)
    guide = AutoFlow(linear_gaussian_vae, local="amortized").setup(data)
    encoder = guide.locals.pseudo_observations.encoders.z.affine
    with torch.no_grad():  # off the exact posterior, wider, so that the weights vary but stay bounded
        encoder.weight.mul_(0.8)
        encoder.bias[2:].sub_(1.0)  # log precision of the pseudo-observations
    scores = item_scores(linear_gaussian_vae, guide, data, num_samples=2000)
    exact = exact_log_likelihood(data)
    assert scores.standard_error.min() > 1e-3  # the check is not vacuous
    assert ((scores.log_likelihood - exact).abs() / scores.standard_error).max() < 4.0
    assert (scores.elbo < exact).all()
    torch.testing.assert_close(scores.elbo, scores.reconstruction - scores.kl)
    assert (scores.kl > 0).all()
    # A guide wider than each posterior bounds the weights: k-hat reads them as good.
    assert scores.khat.shape == (40,) and (scores.khat < 0.5).all()


def test_item_scores_say_why_a_model_with_globals_has_no_per_item_likelihood(fresh_param_store):
    def model(data):
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
        with pyro.plate("items", len(data), subsample_size=5):
            pyro.sample("z", dist.Normal(shift, 1.0))

    guide = AutoFlow(model, local="per-item")
    with pytest.raises(ValueError, match="global latents"):
        item_scores(model, guide, torch.zeros(10), num_samples=2)
