"""ArviZ export of a fitted guide: groups, shapes, plate dims, and consistency of the statistics."""

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoNormal
from pyro.infer.reparam import LocScaleReparam

from vi_flows import AutoFlow, fit
from vi_flows.arviz_export import to_inference_data

pytestmark = pytest.mark.filterwarnings("ignore")

SIGMA = torch.tensor([15.0, 10, 16, 11, 9, 11, 10, 18])
Y = torch.tensor([28.0, 8, -3, 7, -1, 1, 18, 12])


def eight_schools(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", 8):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, SIGMA), obs=y)


@pytest.fixture(scope="module")
def idata():
    pyro.clear_param_store()
    guide = AutoFlow(eight_schools, flow="planar*2")
    fit(eight_schools, guide, Y, num_steps=200, progress=False, seed=0)
    return to_inference_data(guide, eight_schools, Y, num_samples=300)


def test_groups_shapes_and_plate_dims(idata):
    assert {"posterior", "sample_stats", "log_likelihood", "observed_data"} <= set(idata.groups())
    assert idata.posterior["mu"].shape == (1, 300) and idata.posterior["theta"].dims == ("chain", "draw", "school")
    assert (idata.posterior["tau"] > 0).all()
    assert idata.log_likelihood["obs"].dims == ("chain", "draw", "school")
    np.testing.assert_allclose(idata.observed_data["obs"].values, Y.numpy())


def test_statistics_are_consistent(idata):
    stats = idata.sample_stats
    np.testing.assert_allclose(stats["log_weight"], stats["log_p"] - stats["log_q"], rtol=1e-5, atol=1e-4)
    # The pointwise log likelihood is the observation model at the exported draws.
    theta = torch.as_tensor(idata.posterior["theta"].values[0])
    expected = dist.Normal(theta, SIGMA).log_prob(Y).numpy()
    np.testing.assert_allclose(idata.log_likelihood["obs"].values[0], expected, rtol=1e-5, atol=1e-4)


def test_arviz_functions_accept_it(idata, tmp_path):
    assert np.isfinite(az.loo(idata).elpd_loo)
    summary = az.summary(idata, var_names=["mu", "tau"], kind="stats")
    assert list(summary.index) == ["mu", "tau"]
    idata.to_netcdf(tmp_path / "guide.nc")
    assert az.from_netcdf(tmp_path / "guide.nc").posterior["theta"].shape == (1, 300, 8)


def test_deterministic_sites_of_a_reparameterised_model_join_the_posterior():
    """Non-centred, ``theta`` is a value ``poutine.reparam`` computes, which Pyro records as observed."""
    model = poutine.reparam(eight_schools, config={"theta": LocScaleReparam(0.0)})
    pyro.clear_param_store()
    guide = AutoFlow(model, flow="planar*2")
    fit(model, guide, Y, num_steps=20, progress=False, seed=0)
    exported = to_inference_data(guide, model, Y, num_samples=50)
    assert {"mu", "tau", "theta_decentered", "theta"} == set(exported.posterior.data_vars)
    assert exported.posterior["theta"].dims == ("chain", "draw", "school")
    assert list(exported.log_likelihood.data_vars) == ["obs"]
    centred = exported.posterior["mu"] + exported.posterior["tau"] * exported.posterior["theta_decentered"]
    np.testing.assert_allclose(exported.posterior["theta"], centred, rtol=1e-4, atol=1e-4)


def test_pyro_deterministic_sites_join_the_posterior():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        pyro.deterministic("mu_plus_one", mu + 1)
        with pyro.plate("school", 8):
            pyro.sample("obs", dist.Normal(mu, SIGMA), obs=y)

    pyro.clear_param_store()
    guide = AutoFlow(model, flow="planar*2")
    exported = to_inference_data(guide, model, Y, num_samples=50)
    assert {"mu", "mu_plus_one"} == set(exported.posterior.data_vars)
    assert list(exported.log_likelihood.data_vars) == ["obs"]
    np.testing.assert_allclose(exported.posterior["mu_plus_one"], exported.posterior["mu"] + 1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["eight_schools", "hierarchical_100", "ordinal_simplex", "challenger", "funnel", "banana"])
def test_export_of_the_zoos_models_warns_of_nothing(name, caplog):
    import importlib
    import logging
    import warnings as warnings_module

    module = importlib.import_module(f"vi_flows.models.{name}")
    pyro.clear_param_store()
    guide = AutoFlow(module.model, flow="planar", init="prior")
    guide()
    with warnings_module.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings_module.simplefilter("error")
        to_inference_data(guide, module.model, num_samples=50)
    assert not caplog.records, [record.getMessage() for record in caplog.records]


def test_a_guide_without_local_posteriors_exports_the_subsample_it_reads():
    """Pyro's AutoNormal over a subsampled plate: one run, the subsample's items (an AutoFlow's local
    posteriors export every item, tests/test_local.py)."""
    pyro.clear_param_store()
    data = torch.randn(40)

    def model(subsample_size=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("groups", 40, subsample_size=subsample_size) as index:
            effect = pyro.sample("effect", dist.Normal(mu, 1.0))
            pyro.sample("y", dist.Normal(effect, 1.0), obs=data[index])

    guide = AutoNormal(model, create_plates=lambda subsample_size=None: pyro.plate("groups", 40, subsample_size=subsample_size))
    exported = to_inference_data(guide, model, 10, num_samples=5)
    assert exported.posterior["effect"].shape == (1, 5, 10) and exported.posterior["effect"].dims[-1] == "groups"


def test_a_model_written_for_one_draw_exports_what_its_broadcasting_twin_does():
    """``X @ w`` does not broadcast over draws: the model runs once per draw (as ``fit`` maps it), and
    the same seed gives the same export as the regression written to broadcast."""
    features = torch.randn(30, 3, generator=torch.Generator().manual_seed(0))
    outcome = (features @ torch.tensor([1.0, -2.0, 0.5]) > 0).float()

    def regression(logits_of):
        def model():
            w = pyro.sample("w", dist.Normal(torch.zeros(3), 2.0).to_event(1))
            logits = pyro.deterministic("logits", logits_of(w))
            with pyro.plate("data", 30):
                pyro.sample("y", dist.Bernoulli(logits=logits), obs=outcome)

        return model

    for_one_draw, broadcasting = regression(lambda w: features @ w), regression(lambda w: (features * w).sum(-1))
    pyro.clear_param_store()
    guide = AutoFlow(for_one_draw, flow="planar*2")
    guide()  # set up, so that both exports start from the same random state
    exports = []
    for model in (for_one_draw, broadcasting):
        pyro.set_rng_seed(3)
        exports.append(to_inference_data(guide, model, num_samples=40))
    one, other = exports
    assert one.posterior["w"].shape == (1, 40, 3) and one.log_likelihood["y"].dims == ("chain", "draw", "data")
    for group, name in [("posterior", "w"), ("posterior", "logits"), ("log_likelihood", "y"), ("sample_stats", "log_p"), ("sample_stats", "log_q")]:
        np.testing.assert_allclose(one[group][name].values, other[group][name].values, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(one.observed_data["y"].values, outcome.numpy())
