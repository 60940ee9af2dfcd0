"""Posterior accuracy against targets with known log Z, where KL(q || p) = log Z - ELBO.

Budget as in the issue: 3000 steps x 8 vectorised particles, Adam 1e-2. Each threshold is the KL
measured with seed 0 (`python -m vi_flows.bench kl`) plus a margin for seed and platform noise,
and sits well below what a flow that misses the target's shape reaches (noted per case).
"""

import importlib

import pyro
import pytest
from pyro.infer import SVI, Trace_ELBO

from vi_flows import AutoFlow, available_flows
from vi_flows.diagnostics import elbo_estimate, log_importance_weights

pytestmark = pytest.mark.slow


def fitted_kl(target, spec, steps, seed=0):
    module = importlib.import_module(f"vi_flows.models.{target}")
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoFlow(module.model, flow=spec)
    svi = SVI(module.model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO(num_particles=8, vectorize_particles=True))
    for _ in range(steps):
        svi.step()
    elbo, standard_error = elbo_estimate(log_importance_weights(module.model, guide, num_samples=4096))
    return module.LOG_Z - elbo, standard_error


@pytest.mark.parametrize(
    "target,spec,threshold",
    [
        # measured 0.37; the best mean-field Gaussian has KL 0.5 (log det Sigma + sum log Lambda_ii) = 2.46
        ("correlated_gaussian", "householder*8", 0.6),
        # measured 0.48; IAF x 2 reaches 1.25
        ("banana", "sylvester-triangular*8", 0.75),
        # measured 0.61; planar x 8 reaches 1.90
        ("funnel", "iaf*2", 0.9),
        # measured 0.05; a guide on one mode scores log 2 = 0.69
        ("gaussian_mixture", "planar*8", 0.2),
    ],
)
def test_best_flow_reaches_measured_kl(target, spec, threshold):
    kl, standard_error = fitted_kl(target, spec, steps=3000)
    assert kl > -3 * standard_error, f"ELBO above log Z: KL {kl:.3f} +- {standard_error:.3f}"
    assert kl < threshold, f"{spec} on {target}: KL {kl:.3f} +- {standard_error:.3f}"


@pytest.mark.parametrize("target", ["banana", "funnel"])
@pytest.mark.parametrize("flow", [name for name in available_flows() if not name.startswith("test-")])
def test_no_flow_reports_an_elbo_above_log_z(flow, target):
    """An exact log-determinant keeps every ELBO below log Z (Pyro's Sylvester exceeds it)."""
    kl, standard_error = fitted_kl(target, f"{flow}*4", steps=300)
    assert kl > -3 * standard_error, f"{flow}: ELBO exceeds log Z by {-kl:.3f} (se {standard_error:.3f})"
