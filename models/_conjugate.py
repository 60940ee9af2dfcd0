"""Bayesian linear regression with the conjugate normal-inverse-gamma prior: exact posterior and log Z.

    noise_var ~ InverseGamma(shape, rate),  coefficients_j | noise_var ~ N(0, prior_scale^2 noise_var),
    y_i | ... ~ N(x_i . coefficients, noise_var).
"""

import math

import pyro
import pyro.distributions as dist
import torch


class ConjugateRegression:
    def __init__(self, design, response, prior_scale=10.0, prior_shape=2.0, prior_rate=0.01):
        self.design, self.response = design, response
        self.prior_scale, self.prior_shape, self.prior_rate = prior_scale, prior_shape, prior_rate
        x, y = design.double(), response.double()
        n, p = x.shape
        precision = torch.eye(p, dtype=torch.float64) / prior_scale**2 + x.T @ x
        self.posterior_covariance_factor = torch.linalg.inv(precision)
        self.posterior_mean = self.posterior_covariance_factor @ x.T @ y
        self.posterior_shape = prior_shape + n / 2
        self.posterior_rate = prior_rate + 0.5 * (y @ y - self.posterior_mean @ precision @ self.posterior_mean).item()
        self.log_z = (
            -n / 2 * math.log(2 * math.pi)
            - 0.5 * torch.logdet(precision).item()
            - p * math.log(prior_scale)
            + prior_shape * math.log(prior_rate)
            - self.posterior_shape * math.log(self.posterior_rate)
            + math.lgamma(self.posterior_shape)
            - math.lgamma(prior_shape)
        )

    @classmethod
    def simulated(cls, num_coefficients, seed=0):
        """A regression on 2 ``num_coefficients`` simulated data: standard normal covariates and
        coefficients, unit noise."""
        generator = torch.Generator().manual_seed(seed)
        design = torch.randn(2 * num_coefficients, num_coefficients, generator=generator)
        response = design @ torch.randn(num_coefficients, generator=generator)
        return cls(design, response + torch.randn(2 * num_coefficients, generator=generator))

    def model(self):
        noise_var = pyro.sample("noise_var", dist.InverseGamma(self.prior_shape, self.prior_rate))
        with pyro.plate("coefficient", self.design.shape[1]):
            coefficients = pyro.sample("coefficients", dist.Normal(0.0, self.prior_scale * noise_var.sqrt()))
        with pyro.plate("data", self.design.shape[0]):
            pyro.sample("y", dist.Normal(coefficients @ self.design.T, noise_var.sqrt()), obs=self.response)

    def sample_posterior(self, num_samples):
        noise_var = dist.InverseGamma(self.posterior_shape, self.posterior_rate).sample((num_samples,))
        scale_tril = torch.linalg.cholesky(self.posterior_covariance_factor)
        noise = torch.randn(num_samples, len(self.posterior_mean), dtype=torch.float64)
        coefficients = self.posterior_mean + noise_var.sqrt().unsqueeze(-1) * (noise @ scale_tril.T)
        return {"noise_var": noise_var.float(), "coefficients": coefficients.float()}

    def posterior_moments(self):
        """Exact ``{site: (mean, sd)}``: a Student-t for the coefficients, an inverse gamma for the noise."""
        a, b = self.posterior_shape, self.posterior_rate
        coefficient_sd = (b / (a - 1) * self.posterior_covariance_factor.diagonal()).sqrt()
        noise_mean = b / (a - 1)
        noise_sd = noise_mean / math.sqrt(a - 2)
        return {
            "coefficients": (self.posterior_mean.float(), coefficient_sd.float()),
            "noise_var": (torch.tensor(noise_mean), torch.tensor(noise_sd)),
        }
