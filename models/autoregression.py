"""AR(3) time series y_t = c + sum_k phi_k y_{t-k} + noise, conditioned on the first three values."""

import torch

from ._conjugate import ConjugateRegression

DESCRIPTION = "AR(3) regression on 200 simulated steps, conjugate prior (exact)"
ORDER = 3


def _simulate(length=200, seed=7):
    generator = torch.Generator().manual_seed(seed)
    series = torch.zeros(length + ORDER)
    for t in range(ORDER, length + ORDER):
        lags = series[t - ORDER : t].flip(0)
        series[t] = 0.2 + lags @ torch.tensor([0.6, -0.3, 0.2]) + 0.5 * torch.randn((), generator=generator)
    return series


SERIES = _simulate()
_design = torch.stack([torch.ones(len(SERIES) - ORDER)] + [SERIES[ORDER - k : len(SERIES) - k] for k in range(1, ORDER + 1)], -1)
_REGRESSION = ConjugateRegression(_design, SERIES[ORDER:])
model = _REGRESSION.model
sample_posterior = _REGRESSION.sample_posterior
posterior_moments = _REGRESSION.posterior_moments
LOG_Z = _REGRESSION.log_z
