"""The contract every registered flow meets; registering a flow is enough to have it tested here."""

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.distributions.torch_transform import TransformModule
from torch.distributions import constraints
from torch.fx.experimental.proxy_tensor import make_fx

from vi_flows import available_flows, build_flow, registered_flow
from vi_flows.flows.base import forward_and_score
from vi_flows.flows.conditional import ConditionalFlow


class ElementwiseAffine(TransformModule):
    """A user-written flow, registered below, that is not stackable and not a FlowTransform."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, dim):
        super().__init__(cache_size=1)
        self.loc = torch.nn.Parameter(torch.zeros(dim))
        self.log_scale = torch.nn.Parameter(torch.zeros(dim))

    def _call(self, x):
        return self.loc + self.log_scale.exp() * x

    def _inverse(self, y):
        return (y - self.loc) * torch.exp(-self.log_scale)

    def log_abs_det_jacobian(self, x, y):
        return self.log_scale.sum().expand(x.shape[:-1])


# Every registered flow, and a user's flow registered for this module's tests only.
FLOWS = [*available_flows(), "test-elementwise-affine"]


@pytest.fixture(autouse=True, scope="module")
def _user_flow():
    with registered_flow("test-elementwise-affine", ElementwiseAffine):
        yield
DIMS = [1, 2, 5, 17]
BATCH_SHAPES = [(), (3,), (4, 3)]
NUM_LAYERS = 3


def random_flow(name, dim, seed=0, scale=1.0, dtype=torch.float64):
    """A flow with every parameter moved well away from its near-identity initialisation.

    Matrices move by ``scale / sqrt(fan_in)``, the size trained weights have: larger moves make
    deep autoregressive stacks so ill-conditioned (cond(J) > 1e13) that float64 cannot check them.
    """
    torch.manual_seed(seed)
    flow = build_flow(f"{name}*{NUM_LAYERS}", dim).to(dtype)
    with torch.no_grad():
        for parameter in flow.parameters():
            fan_in = parameter.shape[-1] if parameter.dim() > 1 else 1
            parameter.add_(scale / fan_in**0.5 * torch.randn_like(parameter))
    return flow


def jacobian_log_det(flow, x):
    """log|det J| of each row of ``x`` from autograd's dense Jacobian, shape ``x.shape[:-1]``."""
    rows = x.reshape(-1, x.shape[-1])
    values = [torch.linalg.slogdet(torch.autograd.functional.jacobian(flow, row))[1] for row in rows]
    return torch.stack(values).reshape(x.shape[:-1])


@pytest.mark.parametrize("batch_shape", BATCH_SHAPES, ids=str)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("name", FLOWS)
def test_log_det_matches_autograd_jacobian(name, dim, batch_shape):
    flow = random_flow(name, dim, seed=dim)
    x = torch.randn(batch_shape + (dim,), dtype=torch.float64)
    y = flow(x)
    assert y.shape == x.shape and y.dtype == torch.float64
    log_det = flow.log_abs_det_jacobian(x, y)
    assert log_det.shape == batch_shape
    expected = jacobian_log_det(flow, x)
    torch.testing.assert_close(log_det, expected, atol=1e-6, rtol=0)
    # A pair the flow did not just produce is scored from x, not from a stale cache.
    flow(torch.randn_like(x))
    torch.testing.assert_close(flow.log_abs_det_jacobian(x, y.clone()), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("batch_shape", BATCH_SHAPES, ids=str)
@pytest.mark.parametrize("name", FLOWS)
def test_pushed_forward_score_matches_autograd(name, batch_shape):
    # The score behind AutoFlow's sticking_the_landing: J^-T (score - d log|det J|/dx), here from
    # autograd's dense Jacobian row by row, whatever closed form the family uses.
    assert_pushed_score_matches_autograd(random_flow(name, 5, seed=3), torch.randn(batch_shape + (5,), dtype=torch.float64))


def test_pushed_forward_score_of_other_options_and_composed_flows_matches_autograd():
    torch.manual_seed(1)
    bottleneck = {"sylvester-orthogonal": {"bottleneck": 2}}
    flows = build_flow("iaf*3", 5, iaf={"gated": True}), build_flow("sylvester-orthogonal*2", 5, **bottleneck), build_flow("planar*2+iaf*2+radial", 5)
    for flow in flows:
        flow = flow.double()
        with torch.no_grad():  # far from the identity, as random_flow moves them
            for parameter in flow.parameters():
                parameter.add_(torch.randn_like(parameter) / (parameter.shape[-1] ** 0.5 if parameter.dim() > 1 else 1))
        assert_pushed_score_matches_autograd(flow, torch.randn(4, 5, dtype=torch.float64))


def assert_pushed_score_matches_autograd(flow, x):
    score = torch.randn_like(x)
    y, pushed = forward_and_score(flow, x, score)
    assert y.shape == pushed.shape == x.shape
    torch.testing.assert_close(y, flow(x))
    dim = x.shape[-1]
    for row, row_score, row_pushed in zip(x.reshape(-1, dim), score.reshape(-1, dim), pushed.reshape(-1, dim)):
        jacobian = torch.autograd.functional.jacobian(flow, row)
        point = row.clone().requires_grad_()
        log_det = flow.log_abs_det_jacobian(point, flow(point))
        log_det_gradient = torch.autograd.grad(log_det, point, materialize_grads=True)[0] if log_det.requires_grad else 0
        torch.testing.assert_close(row_pushed, torch.linalg.solve(jacobian.T, row_score - log_det_gradient))


class PushedScore(torch.nn.Module):
    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, x):
        return forward_and_score(self.flow, x, -x)[1]


@pytest.mark.parametrize("name", FLOWS)
def test_pushed_forward_score_stays_detached_in_a_traced_graph(name):
    # A traced graph records no grad mode: fit's compiled step replays the loss's graph under autograd,
    # where a score not explicitly detached would be differentiated (to a zero term, at twice the graph).
    scoring = PushedScore(random_flow(name, 3))
    names = [parameter_name for parameter_name, _ in scoring.named_parameters()]

    def score(x, *values):  # the parameters as the graph's inputs, as in fit's step
        return torch.func.functional_call(scoring, dict(zip(names, values)), (x,))

    values = [parameter.detach().clone().requires_grad_() for parameter in scoring.parameters()]
    x = torch.randn(4, 3, dtype=torch.float64)
    assert not make_fx(score)(x, *values)(x, *values).requires_grad


# float32: sequential inverses (IAF, Sylvester) pass rounding errors from coordinate to coordinate,
# so x is recovered to ~1e-3 at cond(J) ~ 60 while y = f(x_back) is still reproduced to 1e-4.
@pytest.mark.parametrize(
    "dtype,x_tolerance,y_tolerance",
    [(torch.float64, 1e-5, 1e-5), (torch.float32, 1e-2, 1e-4)],
    ids=["float64", "float32"],
)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("name", FLOWS)
def test_inverse_round_trip(name, dim, dtype, x_tolerance, y_tolerance):
    flow = random_flow(name, dim, seed=dim + 1, dtype=dtype)
    x = torch.randn(4, 3, dim, dtype=dtype)
    y = flow(x)
    # clone() defeats the transform cache, so the real inverse runs.
    x_back = flow.inv(y.clone())
    assert x_back.dtype == dtype
    torch.testing.assert_close(x_back, x, atol=x_tolerance, rtol=0)
    torch.testing.assert_close(flow(x_back), y, atol=y_tolerance, rtol=0)


@pytest.mark.parametrize("name", FLOWS)
def test_log_prob_of_unseen_points_matches_change_of_variables(name):
    """A TransformedDistribution built on the flow scores arbitrary points exactly."""
    dim = 4
    flow = random_flow(name, dim)
    base = torch.distributions.MultivariateNormal(torch.zeros(dim, dtype=torch.float64), torch.eye(dim, dtype=torch.float64))
    q = torch.distributions.TransformedDistribution(base, [flow])
    y = torch.randn(6, dim, dtype=torch.float64)
    x = flow.inv(y)
    expected = base.log_prob(x) - jacobian_log_det(flow, x)
    torch.testing.assert_close(q.log_prob(y), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", FLOWS)
def test_gradients_are_finite_and_reach_every_parameter(name, dtype):
    flow = random_flow(name, 5, scale=0.5, dtype=dtype)
    x = torch.randn(16, 5, dtype=dtype)
    y = flow(x)
    loss = (y.pow(2).sum(-1) / 2 - flow.log_abs_det_jacobian(x, y)).mean()
    loss.backward()
    for parameter_name, parameter in flow.named_parameters():
        assert parameter.grad is not None, parameter_name
        assert torch.isfinite(parameter.grad).all(), parameter_name
        assert parameter.grad.abs().sum() > 0, parameter_name


@pytest.mark.parametrize("name", FLOWS)
def test_state_dict_round_trip(name):
    flow = random_flow(name, 5, seed=1)
    buffer = io.BytesIO()
    torch.save(flow.state_dict(), buffer)
    buffer.seek(0)
    restored = random_flow(name, 5, seed=2)
    restored.load_state_dict(torch.load(buffer))
    x = torch.randn(7, 5, dtype=torch.float64)
    torch.testing.assert_close(restored(x), flow(x), rtol=0, atol=0)
    torch.testing.assert_close(restored.log_abs_det_jacobian(x, restored(x)), flow.log_abs_det_jacobian(x, flow(x)))


def _devices():
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("name", FLOWS)
def test_device_clean(name, device):
    """Forward, log-det and inverse create no tensor on the default device.

    The default device is set to ``meta`` while the flow runs on ``device``: any tensor made
    without ``device=`` lands on ``meta`` and the computation fails.
    """
    flow = random_flow(name, 5).to(device)
    x = torch.randn(3, 5, dtype=torch.float64, device=device)
    with torch.device("meta"):
        y = flow(x)
        log_det = flow.log_abs_det_jacobian(x, y.clone())
        x_back = flow.inv(y.clone())
    assert y.device.type == log_det.device.type == x_back.device.type == device
    torch.testing.assert_close(x_back, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", FLOWS)
def test_a_new_flow_leaves_a_standard_normal_almost_unchanged(name):
    """Layers start near the identity (Householder: near a rotation), so a guide's base keeps
    the shape it was initialised with; a Laplace-initialised base depends on this."""
    torch.manual_seed(0)
    flow = build_flow(f"{name}*8", 6).double()
    x = torch.randn(100, 6, dtype=torch.float64)
    y = flow(x)
    assert flow.log_abs_det_jacobian(x, y).abs().max() < 0.1
    assert (y.norm(dim=-1) - x.norm(dim=-1)).abs().max() < 0.1


@pytest.mark.parametrize("name", FLOWS)
def test_flows_are_modules_with_parameters_and_event_dim_one(name):
    flow = build_flow(name, 3)
    assert isinstance(flow, TransformModule)
    assert flow.domain.event_dim == flow.codomain.event_dim == 1
    assert sum(p.numel() for p in flow.parameters()) > 0


@settings(max_examples=10, deadline=None)
@given(
    dim=st.integers(1, 8),
    scale=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
    name=st.sampled_from(FLOWS),
)
def test_log_det_and_inverse_property(dim, scale, seed, name):
    flow = random_flow(name, dim, seed=seed, scale=scale)
    x = torch.randn(2, dim, dtype=torch.float64)
    y = flow(x)
    torch.testing.assert_close(flow.log_abs_det_jacobian(x, y), jacobian_log_det(flow, x), atol=1e-6, rtol=0)
    torch.testing.assert_close(flow.inv(y.clone()), x, atol=1e-5, rtol=0)


def test_builtin_flows_are_the_seven_families():
    assert {
        "planar",
        "radial",
        "householder",
        "sylvester-orthogonal",
        "sylvester-householder",
        "sylvester-triangular",
        "iaf",
    } <= set(available_flows())


# Conditional flows: every registered flow with its parameters a function of a per-item context.
CONTEXT_DIM = 4


def random_conditional_flow(name, dim, seed=0, dtype=torch.float64):
    """A conditional flow whose unconditional parameters and context map both sit away from their start."""
    flow = ConditionalFlow(random_flow(name, dim, seed=seed, dtype=dtype), dim, CONTEXT_DIM).to(dtype)
    with torch.no_grad():
        flow.hypernet.weight.normal_(0, 0.3 / CONTEXT_DIM**0.5)
    return flow


@pytest.mark.parametrize("dim", [1, 3])
@pytest.mark.parametrize("name", FLOWS)
def test_conditional_log_det_matches_autograd_per_item(name, dim):
    flow = random_conditional_flow(name, dim, seed=dim)
    context = torch.randn(5, CONTEXT_DIM, dtype=torch.float64)
    x = torch.randn(2, 5, dim, dtype=torch.float64)  # two particles of five items
    transform = flow.condition(context)
    y = transform(x)
    log_det = transform.log_abs_det_jacobian(x, y)
    assert y.shape == x.shape and log_det.shape == (2, 5)
    for item in range(5):
        one = flow.condition(context[item : item + 1])
        expected = jacobian_log_det(lambda row: one(row.unsqueeze(0)).squeeze(0), x[:, item])
        torch.testing.assert_close(log_det[:, item], expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(y[:, item], one(x[:, item].unsqueeze(-2)).squeeze(-2))
    torch.testing.assert_close(transform.log_abs_det_jacobian(x, y.clone()), log_det)


@pytest.mark.parametrize("name", FLOWS)
def test_conditional_flow_follows_its_context_and_starts_unconditional(name):
    flow = random_flow(name, 3, seed=5)
    conditional = ConditionalFlow(flow, 3, CONTEXT_DIM).double()
    context = torch.randn(4, CONTEXT_DIM, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(conditional.condition(context)(x), flow(x))  # the map of the context starts at zero
    with torch.no_grad():
        conditional.hypernet.weight.normal_()
    y = conditional.condition(context)(x)
    assert not torch.allclose(y, flow(x))
    same = conditional.condition(context[:1].expand(4, CONTEXT_DIM))(x)
    torch.testing.assert_close(same[0], y[0])
    assert not torch.allclose(same[1:], y[1:])


@pytest.mark.parametrize("item_shape", [(5,), (2, 3)], ids=str)
@pytest.mark.parametrize("name", FLOWS)
def test_conditional_inverse_round_trip(name, item_shape):
    flow = random_conditional_flow(name, 3, seed=7)
    transform = flow.condition(torch.randn(item_shape + (CONTEXT_DIM,), dtype=torch.float64))
    x = torch.randn((4,) + item_shape + (3,), dtype=torch.float64)
    y = transform(x)
    x_back = transform.inv(y.clone())
    torch.testing.assert_close(x_back, x, atol=1e-5, rtol=0)
    torch.testing.assert_close(transform(x_back), y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", FLOWS)
def test_conditional_gradients_reach_the_flow_and_its_context_map(name):
    flow = random_conditional_flow(name, 3, seed=2)
    context = torch.randn(6, CONTEXT_DIM, dtype=torch.float64)
    x = torch.randn(6, 3, dtype=torch.float64)
    transform = flow.condition(context)
    y = transform(x)
    (y.pow(2).sum(-1) / 2 - transform.log_abs_det_jacobian(x, y)).mean().backward()
    assert flow.hypernet.weight.grad.abs().sum() > 0
    for parameter_name, parameter in flow.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), parameter_name


@pytest.mark.parametrize("name", FLOWS)
def test_conditional_state_dict_round_trip(name):
    flow = random_conditional_flow(name, 3, seed=1)
    buffer = io.BytesIO()
    torch.save(flow.state_dict(), buffer)
    buffer.seek(0)
    restored = random_conditional_flow(name, 3, seed=2)
    restored.load_state_dict(torch.load(buffer))
    context, x = torch.randn(5, CONTEXT_DIM, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(restored.condition(context)(x), flow.condition(context)(x), rtol=0, atol=0)
