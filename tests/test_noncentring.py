"""Partial non-centring: the linearised prior (locations, scales, degrees of non-centring) read from a model,
and the bijection that applies it."""

import importlib

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import init_to_value
from pyro.nn import PyroModule

from vi_flows import AutoFlow, fit
from vi_flows.diagnostics import log_importance_weights
from vi_flows.autoflow.noncentring import PartialNonCentring, linearise_prior

pytestmark = pytest.mark.usefixtures("fresh_param_store")


def _linearised(model, **options):
    pyro.clear_param_store()
    guide = AutoFlow(model, init="prior", non_centring=False, **options)
    guide()
    return guide, linearise_prior(guide)


def _zoo_model(target):
    return importlib.import_module(f"vi_flows.models.{target}").model


def test_the_funnels_x_are_scaled_by_y_and_set_by_the_prior_alone():
    """x_i ~ N(0, exp(y / 2)) and nothing observed: scale slope 1/2 to y (coordinate 0), location 0
    with no slope, and the prior's whole share of the curvature."""
    _, (location, location_slopes, scale_slopes, prior_share) = _linearised(_zoo_model("funnel"))
    expected = torch.zeros_like(scale_slopes)
    expected[1:, 0] = 0.5
    torch.testing.assert_close(scale_slopes, expected)
    assert not location_slopes.any()
    torch.testing.assert_close(location[1:], torch.zeros(9))
    torch.testing.assert_close(prior_share, torch.tensor([0.0] + [1.0] * 9))


def test_a_centred_hierarchys_theta_follow_mu_in_location_and_tau_in_scale():
    """theta_j ~ N(mu, tau), four unit-variance observations each: location mu (slope 1 to mu,
    coordinate 0), scale slope 1 to log tau (coordinate 1), and the prior's share of the curvature
    tau^-2 / (tau^-2 + 4), the weight of the optimal partial non-centring."""
    guide, (location, location_slopes, scale_slopes, prior_share) = _linearised(_zoo_model("hierarchical_100"))
    mu, log_tau = guide.centre[:2]
    torch.testing.assert_close(location[2:], mu.expand(100))
    expected = torch.zeros_like(scale_slopes)
    expected[2:, 0] = 1.0
    torch.testing.assert_close(location_slopes, expected)
    expected = torch.zeros_like(scale_slopes)
    expected[2:, 1] = 1.0
    torch.testing.assert_close(scale_slopes, expected)
    precision = (-2 * log_tau).exp()
    torch.testing.assert_close(prior_share[2:], (precision / (precision + 4)).expand(100))
    assert not prior_share[:2].any()


def test_a_child_without_a_scale_parent_is_left_alone():
    """The banana's x2 ~ N(f(x1), 1) follows x1 in location only: no row to non-centre."""
    _, (_, location_slopes, scale_slopes, prior_share) = _linearised(_zoo_model("banana"))
    assert not location_slopes.any() and not scale_slopes.any() and not prior_share.any()


def test_slopes_leave_out_scales_set_by_module_parameters_and_follow_a_chain():
    """In a ``PyroModule``, b's scale comes from a parameter (a moves only its location) and c's from
    b; d's from c and, through a softplus, from a (slope sigmoid(a) / softplus(a) at a = 0.4)."""

    class Chain(PyroModule):
        def __init__(self):
            super().__init__()
            self.log_scale = torch.nn.Parameter(torch.tensor(0.3))

        def forward(self):
            a = pyro.sample("a", dist.Normal(0.0, 1.0))
            b = pyro.sample("b", dist.Normal(a, self.log_scale.exp()))
            c = pyro.sample("c", dist.Normal(0.0, (b / 2).exp()))
            pyro.sample("d", dist.Normal(0.0, (2 * c).exp() * torch.nn.functional.softplus(a)))

    values = {"a": torch.tensor(0.4), "b": torch.tensor(0.0), "c": torch.tensor(0.0), "d": torch.tensor(0.0)}
    _, (_, location_slopes, scale_slopes, _) = _linearised(Chain(), init_loc_fn=init_to_value(values=values))
    expected = torch.zeros(4, 4)
    expected[2, 1], expected[3, 2] = 0.5, 2.0
    expected[3, 0] = torch.sigmoid(torch.tensor(0.4)) / torch.nn.functional.softplus(torch.tensor(0.4))
    torch.testing.assert_close(scale_slopes, expected)
    assert not location_slopes.any()


def _random_layer(dim, generator):
    """Random slopes on chains of depth up to ``dim - 1``, random weights, origin and location, in float64."""
    options = {"dtype": torch.float64, "generator": generator}

    def slopes():
        matrix = (0.5 * torch.randn(dim, dim, **options)).tril(-1)
        matrix[torch.rand(dim, dim, **options) < 0.3] = 0.0  # some pairs are not parents
        return matrix

    origin, location = torch.randn(2, dim, **options)
    return PartialNonCentring(origin, location, slopes(), slopes(), weight=torch.rand(dim, **options) + 0.5)


@pytest.mark.parametrize("dim", [1, 2, 5, 9])
@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 4)], ids=str)
def test_log_det_matches_the_autograd_jacobian_and_the_inverse_round_trips(dim, batch_shape):
    generator = torch.Generator().manual_seed(dim)
    layer = _random_layer(dim, generator)
    u = torch.randn(*batch_shape, dim, dtype=torch.float64, generator=generator)
    x = layer(u)
    flat = u.reshape(-1, dim)
    expected = torch.stack([torch.linalg.slogdet(torch.autograd.functional.jacobian(layer._call, point))[1] for point in flat])
    torch.testing.assert_close(layer.log_abs_det_jacobian(u, x).reshape(-1), expected)
    torch.testing.assert_close(layer.inv(x.clone()), u)  # a copy: the inverse, not the cache


def test_a_chain_follows_the_output_values():
    """c's scale follows b's value and b's follows a's (two passes fill in c); b's location follows a
    at half weight (so does its scale)."""
    zero, one = torch.zeros(3), torch.ones(3)
    scale_slopes = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    location_slopes = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    layer = PartialNonCentring(zero, zero, location_slopes, scale_slopes, weight=torch.tensor([1.0, 0.5, 1.0]))
    assert layer.depth == 2
    b = torch.tensor(0.5 + torch.e**0.5)
    torch.testing.assert_close(layer(one), torch.stack([one[0], b, b.exp()]))


def test_autoflow_represents_the_centred_funnel_exactly():
    """Fully non-centred (weight 1: no data touch x), a standard base with sds (3, 1, ..., 1) is Neal's
    funnel: every importance weight is 1, through a flow whose layers are the identity."""
    from vi_flows.models import funnel

    origin = init_to_value(values={"y": torch.tensor(0.0), "x": torch.zeros(funnel.NUM_X)})
    guide = AutoFlow(funnel.model, flow="planar", init="prior", init_loc_fn=origin, init_scale=1.0)
    guide()
    with torch.no_grad():
        guide.flow.u.zero_()
        guide.base.scale = torch.tensor([3.0] + [1.0] * funnel.NUM_X)
    assert log_importance_weights(funnel.model, guide, num_samples=2000).abs().max() < 1e-4
    with torch.no_grad():  # centred: x's scale no longer follows y
        guide.non_centring.weight.zero_()
    assert log_importance_weights(funnel.model, guide, num_samples=2000).abs().max() > 1


def test_non_centring_can_be_turned_off_and_is_absent_without_scale_parents():
    funnel = _zoo_model("funnel")
    guide = AutoFlow(funnel, init="prior", non_centring=False)
    guide()
    assert not any(isinstance(part, PartialNonCentring) for part in guide.get_transform().parts)
    pyro.clear_param_store()
    guide = AutoFlow(_zoo_model("banana"), init="prior")
    guide()
    assert guide.non_centring is None
    pyro.clear_param_store()
    guide = AutoFlow(funnel, init="prior")
    guide()
    assert isinstance(guide.get_transform().parts[-1], PartialNonCentring)


def test_a_laplace_start_relinearises_the_prior_at_the_mode():
    """The regression's Laplace start wins (its coefficients' sds span 1e-4 to 0.1): the map is then
    linearised about the mode, where the coefficients' data pin them and their weights are small."""
    guide = AutoFlow(_zoo_model("regression_scaled"), flow="planar")
    guide()
    assert guide.init_used == "laplace"
    torch.testing.assert_close(guide.non_centring.origin, guide.centre)
    assert 0 < guide.non_centring.weight.max() < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_non_centring_runs_on_the_models_device():
    def model():
        tau = pyro.sample("tau", dist.LogNormal(torch.zeros((), device="cuda"), 1.0))
        with pyro.plate("groups", 4):
            theta = pyro.sample("theta", dist.Normal(torch.zeros((), device="cuda"), tau))
            pyro.sample("y", dist.Normal(theta, 1.0), obs=torch.arange(4.0, device="cuda"))

    guide = AutoFlow(model)
    fit(model, guide, num_steps=20, progress=False)
    assert guide.non_centring.scale_slopes.device.type == "cuda"
    assert guide.sample_constrained(10)["theta"].device.type == "cuda"


def test_jacobian_rows_are_the_same_batched_or_one_at_a_time(monkeypatch):
    from vi_flows.autoflow import noncentring

    inputs = torch.randn(4, dtype=torch.float64, requires_grad=True)
    outputs = torch.stack([inputs[0] * inputs[1], inputs[2].sin(), inputs.pow(2).sum()])
    expected = torch.autograd.functional.jacobian(lambda x: torch.stack([x[0] * x[1], x[2].sin(), x.pow(2).sum()]), inputs)
    torch.testing.assert_close(noncentring._jacobian(outputs, inputs), expected)
    grad = torch.autograd.grad

    def unbatched(*args, is_grads_batched=False, **kwargs):
        if is_grads_batched:
            raise RuntimeError("no batching rule")
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", unbatched)
    torch.testing.assert_close(noncentring._jacobian(outputs, inputs), expected)
