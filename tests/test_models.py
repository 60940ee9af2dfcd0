"""The zoo's exact quantities agree with independent calculations."""

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO
from vi_flows.models import (
    autoregression,
    banana,
    correlated_gaussian,
    energy_u2,
    funnel,
    gaussian_mixture,
    reference_moments,
    regression_scaled,
)

from vi_flows import AutoFlow
from vi_flows.diagnostics import log_importance_weights
from vi_flows.zoo import list_models, load_model


def test_energy_u2_log_z_matches_the_closed_form():
    # z2 | z1 is N(w1(z1), 0.4^2) up to its normaliser, z1 uniform on [-4, 4], prior density 1/64.
    expected = math.log(8 * 0.4 * math.sqrt(2 * math.pi) / 64)
    assert abs(energy_u2.LOG_Z - expected) < 1e-4


@pytest.mark.parametrize(
    "module",
    [regression_scaled, autoregression, correlated_gaussian, banana, gaussian_mixture],
    ids=lambda m: m.__name__.split(".")[-1],
)
def test_closed_form_moments_match_the_exact_sampler(module):
    torch.manual_seed(0)
    draws = module.sample_posterior(200000)
    for name, (mean, sd) in reference_moments(module).items():
        torch.testing.assert_close(draws[name].mean(0), mean, atol=0.02 * sd.max().item(), rtol=0)
        torch.testing.assert_close(draws[name].std(0), sd, rtol=0.02, atol=0)


def test_funnel_moments_match_the_sampler_and_quadrature():
    """y's moments against exact draws; x's sd, whose sample estimate converges too slowly to check,
    against E[exp(y)] by quadrature over y ~ N(0, 3)."""
    torch.manual_seed(0)
    moments = funnel.posterior_moments()
    draws = funnel.sample_posterior(200000)
    torch.testing.assert_close(draws["y"].mean(), moments["y"][0], atol=0.02 * 3, rtol=0)
    torch.testing.assert_close(draws["y"].std(), moments["y"][1], rtol=0.02, atol=0)
    y = torch.linspace(-40.0, 40.0, 80001, dtype=torch.float64)
    x_var = torch.trapezoid(y.exp() * pyro.distributions.Normal(0.0, 3.0).log_prob(y).exp(), y)
    torch.testing.assert_close(moments["x"][1], x_var.sqrt().float().expand(funnel.NUM_X), rtol=1e-4, atol=0)
    assert (moments["x"][0] == 0).all()  # x_i | y is centred for every y


def test_hierarchical_quadrature_moments_match_importance_sampling_from_the_prior():
    """Eight schools' exact moments (quadrature over tau, closed form given tau) against 2 x 10^6
    prior draws weighted by the likelihood (ESS in the hundreds of thousands)."""
    from vi_flows.models import eight_schools

    generator = torch.Generator().manual_seed(0)
    num = 2_000_000
    mu = 5.0 * torch.randn(num, generator=generator, dtype=torch.float64)
    tau = 5.0 * torch.randn(num, generator=generator, dtype=torch.float64).div(torch.randn(num, generator=generator, dtype=torch.float64)).abs()
    theta = mu.unsqueeze(-1) + tau.unsqueeze(-1) * torch.randn(num, 8, generator=generator, dtype=torch.float64)
    log_weight = pyro.distributions.Normal(theta, eight_schools.STANDARD_ERRORS.double()).log_prob(eight_schools.EFFECTS.double()).sum(-1)
    weight = (log_weight - log_weight.logsumexp(0)).exp()
    assert 1 / (weight**2).sum() > 1e5
    for name, values in {"mu": mu, "theta": theta}.items():
        exact_mean, exact_sd = eight_schools.posterior_moments()[name]
        mean = (weight.unsqueeze(-1) * values.reshape(num, -1)).sum(0)
        sd = ((weight.unsqueeze(-1) * (values.reshape(num, -1) - mean) ** 2).sum(0)).sqrt()
        torch.testing.assert_close(mean.float().reshape(exact_mean.shape), exact_mean, atol=0.02 * exact_sd.max().item(), rtol=0)
        torch.testing.assert_close(sd.float().reshape(exact_sd.shape), exact_sd, rtol=0.02, atol=0)


def test_the_hierarchies_marginal_likelihood_is_the_dense_gaussians():
    """The O(J) marginal likelihood the quadrature weighs tau by equals torch's dense
    ``MultivariateNormal`` in float64, at variances spanning six orders of magnitude."""
    from vi_flows.models._hierarchical import marginal_log_likelihood

    generator = torch.Generator().manual_seed(0)
    y = 3.0 * torch.randn(12, generator=generator, dtype=torch.float64)
    variances = torch.logspace(-3, 3, 7, dtype=torch.float64).unsqueeze(-1) * torch.rand(7, 12, generator=generator, dtype=torch.float64).add(0.5)
    dense = pyro.distributions.MultivariateNormal(torch.zeros(12, dtype=torch.float64), 5.0**2 + torch.diag_embed(variances))
    torch.testing.assert_close(marginal_log_likelihood(y, variances, 5.0), dense.log_prob(y), rtol=1e-10, atol=0)  # the dense Cholesky rounds to 2e-12


@pytest.mark.parametrize("module", [regression_scaled, autoregression], ids=lambda m: m.__name__.split(".")[-1])
def test_conjugate_log_z_matches_importance_sampling_from_the_posterior(module):
    """log Z = log p(x, theta) - log p(theta | x) at any theta: check it at exact draws."""
    torch.manual_seed(1)
    draws = module.sample_posterior(5)
    regression = module._REGRESSION
    for index in range(5):
        values = {name: value[index] for name, value in draws.items()}
        with torch.no_grad():
            trace = poutine.trace(poutine.condition(regression.model, values)).get_trace()
        log_joint = trace.log_prob_sum().item()
        noise_var = values["noise_var"].double()
        log_posterior = (
            pyro.distributions.InverseGamma(regression.posterior_shape, regression.posterior_rate).log_prob(noise_var)
            + pyro.distributions.MultivariateNormal(
                regression.posterior_mean, covariance_matrix=noise_var * regression.posterior_covariance_factor
            ).log_prob(values["coefficients"].double())
        ).item()
        assert abs(log_joint - log_posterior - module.LOG_Z) < 1e-2


@pytest.mark.parametrize("name", list_models())
def test_every_zoo_model_loads_and_gives_a_finite_vectorised_elbo(name):
    """Fits and scores vectorise over particles, so every zoo model must broadcast over a leading dimension."""
    module = load_model(name)
    assert module.DESCRIPTION
    if hasattr(module, "sample_posterior") and module.LOG_Z is not None:
        draws = module.sample_posterior(10)
        assert all(value.shape[0] == 10 for value in draws.values())
    pyro.clear_param_store()
    guide = AutoFlow(module.model, flow="planar", init="prior")
    loss = Trace_ELBO(num_particles=3, vectorize_particles=True).loss(module.model, guide)
    assert math.isfinite(loss)
    assert torch.isfinite(log_importance_weights(module.model, guide, num_samples=3)).all()


def test_challenger_data_give_the_published_maximum_likelihood_fit():
    """Dalal, Fowlkes & Hoadley (1989): logistic MLE intercept 15.043, slope -0.2322 per degree F."""
    from vi_flows.models import challenger

    design = torch.stack([torch.ones(23), challenger.TEMPERATURE], -1).double()
    distress = challenger.DISTRESS.double()
    assert len(distress) == 23 and distress.sum() == 7
    coefficients = torch.zeros(2, dtype=torch.float64)
    for _ in range(25):  # Newton's method on the log likelihood
        p = torch.sigmoid(design @ coefficients)
        hessian = design.T @ (design * (p * (1 - p)).unsqueeze(-1))
        coefficients = coefficients + torch.linalg.solve(hessian, design.T @ (distress - p))
    torch.testing.assert_close(coefficients, torch.tensor([15.0429, -0.2322], dtype=torch.float64), atol=1e-4, rtol=0)
