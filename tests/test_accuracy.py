"""Posterior accuracy against targets with known log Z, where KL(q || p) = log Z - ELBO.

The default guide and the default ``fit`` (no learning rate or step count given), seed 0. Each
threshold is the measured KL plus a margin for seed and platform noise, and lies well below what a
guide of the wrong shape reaches (noted per case).
"""

import importlib

import pyro
import pytest
from pyro.infer import SVI, Trace_ELBO

from vi_flows import AutoFlow, available_flows
from vi_flows.diagnostics import elbo_estimate, log_importance_weights

pytestmark = pytest.mark.slow


def kl_of(module, guide):
    elbo, standard_error = elbo_estimate(log_importance_weights(module.model, guide, num_samples=4096))
    return module.LOG_Z - elbo, standard_error


@pytest.mark.parametrize(
    "target,threshold",
    [
        # measured 0.0002 (seed 0; 0.003-0.007 with the plain gradient, which the path-derivative one
        # replaces here); the best mean-field Gaussian has KL 0.5 (log det Sigma + sum log Lambda_ii) = 2.46
        ("correlated_gaussian", 0.001),
        # measured 0.022 (seed 0; 0.003-0.022 over seeds 0-9, median 0.007, at 2138727: RESULTS.md,
        # "Time to a good posterior"); householder*8, which can only rotate a Gaussian, reaches 1.26
        ("banana", 0.03),
        # measured -0.0001 +- 0.0001 (seed 0; <= 0.0006 over seeds 0-4), through AutoFlow's non-centring;
        # without it 0.0068, and planar*8 reaches 1.65
        ("funnel", 0.002),
        # measured 0.0008 (seed 0); a guide on one mode scores log 2 = 0.69
        ("gaussian_mixture", 0.005),
    ],
)
def test_default_fit_reaches_measured_kl(target, threshold, default_fit):
    module = importlib.import_module(f"vi_flows.models.{target}")
    guide, _ = default_fit(target)
    kl, standard_error = kl_of(module, guide)
    assert kl > -3 * standard_error, f"ELBO above log Z: KL {kl:.3f} +- {standard_error:.3f}"
    assert kl < threshold, f"default guide on {target}: KL {kl:.3f} +- {standard_error:.3f}"


@pytest.mark.parametrize("target", ["banana", "funnel"])
@pytest.mark.parametrize("flow", list(available_flows()))
def test_no_flow_reports_an_elbo_above_log_z(flow, target):
    """An exact log-determinant keeps every ELBO below log Z (Pyro's Sylvester exceeds it)."""
    module = importlib.import_module(f"vi_flows.models.{target}")
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoFlow(module.model, flow=f"{flow}*4")
    svi = SVI(module.model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO(num_particles=8, vectorize_particles=True))
    for _ in range(300):
        svi.step()
    kl, standard_error = kl_of(module, guide)
    assert kl > -3 * standard_error, f"{flow}: ELBO exceeds log Z by {-kl:.3f} (se {standard_error:.3f})"
