"""Eight schools (Rubin 1981), centred: the classic hierarchical model with a funnel-shaped posterior."""

import pyro
import pyro.distributions as dist
import torch

DESCRIPTION = "eight schools, centred parametrisation (hierarchical, funnel in tau; NUTS reference)"
LOG_Z = None
EFFECTS = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
STANDARD_ERRORS = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def model():
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(EFFECTS)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, STANDARD_ERRORS), obs=EFFECTS)
