"""Neal's funnel in 10 dimensions: y ~ N(0, 3), x_i | y ~ N(0, exp(y / 2)) for i = 1..9."""

import pyro
import pyro.distributions as dist

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
