"""Linear regression whose covariates live on scales 0.1 to 100 (posterior sds from 1e-4 to 0.1)."""

import torch

from ._conjugate import ConjugateRegression

DESCRIPTION = "linear regression, covariate scales 0.1..100, conjugate prior (exact; posterior sds 1e-4..0.1)"
COVARIATE_SCALES = torch.tensor([1.0, 10.0, 0.1, 100.0])  # the first column is the intercept

_generator = torch.Generator().manual_seed(20261125)
_design = torch.randn(100, 4, generator=_generator) * COVARIATE_SCALES
_design[:, 0] = 1.0
_response = _design @ torch.tensor([0.5, 0.02, 1.5, -0.003]) + 0.08 * torch.randn(100, generator=_generator)

_REGRESSION = ConjugateRegression(_design, _response)
model = _REGRESSION.model
sample_posterior = _REGRESSION.sample_posterior
posterior_moments = _REGRESSION.posterior_moments
LOG_Z = _REGRESSION.log_z
