"""AutoFlow behaves as a Pyro autoguide where Pyro's own autoguide tests found it did not."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceGraph_ELBO
from pyro.infer.autoguide import AutoDelta, AutoGuideList

from vi_flows import AutoFlow, build_flow, fit
from vi_flows.flows import IAF

pytestmark = pytest.mark.usefixtures("fresh_param_store")


def two_site_model():
    x = pyro.sample("x", dist.Normal(0.0, 1.0))
    with pyro.plate("items", 3):
        y = pyro.sample("y", dist.Normal(x, 1.0))
        pyro.sample("obs", dist.Normal(y, 0.5), obs=torch.tensor([0.3, -0.2, 1.0]))


@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceGraph_ELBO])
def test_a_laplace_start_inside_a_guide_list_leaves_the_svi_step_working(elbo):
    # The default init="auto" fits a Laplace approximation during the first SVI step, while that
    # step is recording parameters: it must neither touch the param store nor warn about plates.
    guide = AutoGuideList(two_site_model)
    guide.append(AutoDelta(poutine.block(two_site_model, expose=["x"])))
    guide.append(AutoFlow(poutine.block(two_site_model, expose=["y"]), flow="planar"))
    svi = SVI(two_site_model, guide, pyro.optim.Adam({"lr": 0.01}), elbo())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*plate statements in guide but not model")
        losses = [svi.step() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert guide[1].init_used in ("prior", "laplace")


def test_a_traced_guide_saves_and_loads_with_the_same_draws(tmp_path):
    guide = AutoFlow(two_site_model, flow="planar*2+iaf+householder+radial+sylvester")
    guide()
    traced = torch.jit.trace_module(guide, {"forward": ()}, check_trace=False, strict=False)
    path = tmp_path / "guide.pt"
    torch.jit.save(traced, path)
    loaded = torch.jit.load(path)
    torch.manual_seed(4)
    expected = traced()
    torch.manual_seed(4)
    actual = loaded()
    for name in expected:
        assert torch.equal(actual[name], expected[name])
    predictive = Predictive(two_site_model, guide=guide, num_samples=5)
    assert predictive()["obs"].shape == (5, 3)


@pytest.mark.parametrize("name", ["planar", "radial", "householder", "sylvester", "sylvester-orthogonal", "sylvester-triangular", "iaf"])
def test_every_flow_has_a_sign_and_a_cache_free_copy(name):
    flow = build_flow(name, 3)
    z = torch.randn(4, 3)
    # torch's Transform.sign: the sign of the Jacobian's determinant, the same everywhere.
    jacobian = torch.func.vmap(torch.func.jacrev(lambda point: flow.with_cache(0)(point)))(z)
    assert (torch.linalg.det(jacobian).sign() == flow.sign).all()
    uncached = flow.with_cache(0)
    torch.testing.assert_close(uncached(z), flow(z))
    torch.testing.assert_close(uncached.log_abs_det_jacobian(z, uncached(z)), flow.log_abs_det_jacobian(z, flow(z)))


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"init_scael": 0.01}, "'planar' takes no option 'init_scael'"),
        ({"create_plates": None}, "'planar' takes no option 'create_plates'"),
        ({"iaf": {"hidden": 4}}, "'iaf' names a flow that is not in the spec"),
    ],
)
def test_unknown_options_are_refused_at_construction_with_the_valid_ones(options, fragment):
    with pytest.raises(TypeError, match=fragment) as error:
        AutoFlow(two_site_model, flow="planar", **options)
    assert "Options each flow of the spec takes: planar: none" in str(error.value)


def test_gated_iaf_stays_finite_far_from_the_identity():
    flow = IAF(4, num_layers=2, gated=True)
    with torch.no_grad():
        flow.output_bias[:, 4:] = -200.0  # the gates' half: they underflow to zero without a floor
    z = torch.randn(10, 4)
    y = flow(z)
    assert torch.isfinite(y).all() and torch.isfinite(flow.log_abs_det_jacobian(z, y)).all()
    torch.testing.assert_close(flow.inv(y.clone()), z, atol=1e-3, rtol=1e-3)  # a copy: not from the cache


def test_a_guide_whose_names_another_guide_holds_says_what_to_do():
    def other_model():
        pyro.sample("a", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    first = AutoFlow(two_site_model, flow="planar")
    fit(two_site_model, first, num_steps=5, progress=False)
    with pytest.raises(ValueError, match=r"already holds 'AutoFlow\.\S+' with shape \(.*?\), put there by another.*clear_param_store"):
        AutoFlow(other_model, flow="planar")()  # no clear_param_store() between the two
    second = AutoFlow(other_model, flow="planar", name="other")
    fit(other_model, second, num_steps=5, progress=False)
    assert first.sample_constrained(3)["y"].shape == (3, 3) and second.sample_constrained(3)["a"].shape == (3, 2)
    assert "other.loc" in pyro.get_param_store() and pyro.get_param_store()["AutoFlow.loc"].shape == (4,)


def test_posterior_mean_and_variance_are_monte_carlo_estimates():
    def model():
        pyro.sample("x", dist.Normal(torch.tensor([1.0, -1.0]), torch.tensor([0.5, 2.0])).to_event(1))

    guide = AutoFlow(model, flow="planar", init="laplace")  # exact for a Gaussian
    guide()
    posterior = guide.get_posterior()
    torch.testing.assert_close(posterior.mean, torch.tensor([1.0, -1.0]), atol=0.1, rtol=0)
    torch.testing.assert_close(posterior.variance, torch.tensor([0.25, 4.0]), rtol=0.05, atol=0)
    assert torch.equal(posterior.mean, guide.get_posterior().mean)  # fixed draws
