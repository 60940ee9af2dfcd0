"""Ordered, simplex and positive parameters: an ordinal regression with a Dirichlet-multinomial part."""

import pyro
import pyro.distributions as dist
import torch

DESCRIPTION = "ordinal regression (ordered cutpoints) + Dirichlet weights + positive scale (NUTS reference)"
LOG_Z = None

_generator = torch.Generator().manual_seed(11)
COVARIATE = torch.randn(120, generator=_generator)
CATEGORIES = torch.bucketize(1.2 * COVARIATE + 0.6 * torch.randn(120, generator=_generator), torch.tensor([-1.0, 0.0, 1.2]))
COUNTS = torch.tensor([18.0, 7.0, 25.0])
TOTAL_COUNT = int(COUNTS.sum())  # a Python int, so the model never reads a tensor value
MEASUREMENTS = 2.0 + 0.7 * torch.randn(30, generator=_generator)


def model():
    slope = pyro.sample("slope", dist.Normal(0.0, 2.0))
    cutpoints = pyro.sample(
        "cutpoints",
        dist.TransformedDistribution(dist.Normal(0.0, 3.0).expand([3]).to_event(1), dist.transforms.OrderedTransform()),
    )
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(3)))
    scale = pyro.sample("scale", dist.HalfNormal(2.0))
    with pyro.plate("ordinal", len(COVARIATE)):
        pyro.sample("category", dist.OrderedLogistic(slope * COVARIATE, cutpoints), obs=CATEGORIES)
    pyro.sample("counts", dist.Multinomial(TOTAL_COUNT, weights), obs=COUNTS)
    with pyro.plate("measurement", len(MEASUREMENTS)):
        pyro.sample("measured", dist.Normal(2.0, scale), obs=MEASUREMENTS)
