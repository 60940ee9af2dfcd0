"""Eight schools (Rubin 1981), non-centred: theta = mu + tau * theta_tilde removes the funnel."""

import pyro
import pyro.distributions as dist

from .eight_schools import EFFECTS, STANDARD_ERRORS

DESCRIPTION = "eight schools, non-centred parametrisation (NUTS reference)"
LOG_Z = None


def model():
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(EFFECTS)):
        theta_tilde = pyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * theta_tilde)
        pyro.sample("y", dist.Normal(theta, STANDARD_ERRORS), obs=EFFECTS)
