"""Bayesian logistic regression on the Space Shuttle O-ring data (a real data set, shipped here).

The 23 shuttle flights before the Challenger accident (28 January 1986): launch temperature in
degrees Fahrenheit and whether any field-joint O-ring showed thermal distress, as tabulated by
Dalal, Fowlkes & Hoadley (1989), "Risk analysis of the Space Shuttle: pre-Challenger prediction
of failure", JASA 84(408), 945-957. The temperature enters uncentred, as in the original
analysis, so intercept and slope are almost perfectly correlated a posteriori (-0.99 under NUTS): a
mean-field guide cannot represent that; a full-rank Gaussian or a flow can.
"""

import pyro
import pyro.distributions as dist
import torch

DESCRIPTION = "logistic regression, Space Shuttle O-ring distress vs launch temperature (23 real flights; NUTS reference)"
LOG_Z = None
TEMPERATURE = torch.tensor(
    [66.0, 70, 69, 68, 67, 72, 73, 70, 57, 63, 70, 78, 67, 53, 67, 75, 70, 81, 76, 79, 75, 76, 58]
)
DISTRESS = torch.tensor([0.0, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 1])


def model(temperature=TEMPERATURE, distress=DISTRESS):
    intercept = pyro.sample("intercept", dist.Normal(0.0, 10.0))
    slope = pyro.sample("slope", dist.Normal(0.0, 1.0))
    with pyro.plate("flight", len(temperature)):
        logits = intercept + slope * temperature
        pyro.sample("distress", dist.Bernoulli(logits=logits), obs=distress)
