"""AutoFlow on the kinds of models users write, with every ELBO and utility Pyro offers."""

import copy
import functools
import io
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import (
    SVI,
    JitTrace_ELBO,
    Predictive,
    RenyiELBO,
    Trace_ELBO,
    TraceMeanField_ELBO,
)
from pyro.infer.autoguide import AutoNormalizingFlow, init_to_value
from pyro.nn import PyroModule, PyroSample

from vi_flows import AutoFlow, available_flows, transform_fn
from vi_flows.compiled_elbo import negative_elbo
from vi_flows.particles import Particles
from vi_flows.autoflow.noncentring import PartialNonCentring

pytestmark = [pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"), pytest.mark.usefixtures("fresh_param_store")]


def constrained_model(y, improper=True):
    """Positive, interval, simplex, LKJ-Cholesky and ordered sites; a plate, a mask, a factor,
    a deterministic site and (unless ``improper=False``) ImproperUniform sites."""
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    rho = pyro.sample("rho", dist.Uniform(-1.0, 1.0))
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(3)))
    chol = pyro.sample("chol", dist.LKJCholesky(2, 2.0))
    if improper:
        cuts = pyro.sample("cuts", dist.ImproperUniform(dist.constraints.ordered_vector, (), (3,)))
        free = pyro.sample("free", dist.ImproperUniform(dist.constraints.real, (), (2,)))
    else:
        sorted_normal = dist.TransformedDistribution(dist.Normal(0.0, 3.0).expand([3]).to_event(1), dist.transforms.OrderedTransform())
        cuts = pyro.sample("cuts", sorted_normal)
        free = pyro.sample("free", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    pyro.factor("extra_prior", dist.Normal(0.0, 3.0).log_prob(cuts).sum() + dist.Normal(0.0, 1.0).log_prob(free).sum())
    pyro.deterministic("scale_squared", sigma**2)
    with pyro.plate("groups", 4):
        effect = pyro.sample("effect", dist.Normal(0.0, 1.0))
        with poutine.mask(mask=torch.tensor([True, True, False, True])):
            pyro.sample("masked", dist.Normal(effect, 1.0), obs=torch.zeros(4))
    mean = (weights * chol[..., 1, :].sum(-1, keepdim=True)).sum(-1) + rho + effect.sum(-1) + free.sum(-1)
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(mean.unsqueeze(-1), sigma.unsqueeze(-1)), obs=y)


DATA = torch.randn(20)
ELBOS = {
    "Trace_ELBO": lambda: Trace_ELBO(),
    "Trace_ELBO-vectorized": lambda: Trace_ELBO(num_particles=4, vectorize_particles=True),
    "TraceMeanField_ELBO": lambda: TraceMeanField_ELBO(),
    "RenyiELBO": lambda: RenyiELBO(alpha=0.5, num_particles=4),
    "JitTrace_ELBO": lambda: JitTrace_ELBO(num_particles=4, vectorize_particles=True),
}


def fit(model, guide, *args, elbo=None, steps=20, lr=1e-2):
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), elbo or Trace_ELBO())
    return [svi.step(*args) for _ in range(steps)]


@pytest.mark.parametrize("elbo", ELBOS)
@pytest.mark.parametrize("flow", [*available_flows(), "householder*2+planar*2"])
def test_every_flow_fits_a_constrained_model_with_every_elbo(flow, elbo):
    guide = AutoFlow(constrained_model, flow=flow)
    losses = fit(constrained_model, guide, DATA, elbo=ELBOS[elbo](), steps=5)
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    before = guide.loc.detach().clone()
    fit(constrained_model, guide, DATA, elbo=ELBOS[elbo](), steps=2)
    assert not torch.equal(before, guide.loc.detach())


@pytest.mark.parametrize("base", ["standard", "diagonal", "fullrank"])
def test_samples_respect_constraints_and_predictive_works(base):
    # Pyro's Predictive draws every site from its prior once (to count plates), which
    # ImproperUniform cannot do whatever the guide; so this model uses proper priors.
    model = functools.partial(constrained_model, improper=False)
    guide = AutoFlow(model, flow="planar*2", base=base)
    fit(model, guide, DATA, steps=10)
    # Predictive keeps a singleton dimension for each plate level: (50, 1) for a global site.
    draws = {name: value.squeeze(1) for name, value in Predictive(model, guide=guide, num_samples=50)(DATA).items()}
    assert draws["sigma"].shape == (50,) and (draws["sigma"] > 0).all()
    assert ((draws["rho"] > -1) & (draws["rho"] < 1)).all()
    torch.testing.assert_close(draws["weights"].sum(-1), torch.ones(50))
    assert (draws["cuts"].diff(dim=-1) > 0).all()
    assert draws["chol"].shape == (50, 2, 2)
    torch.testing.assert_close(draws["chol"].pow(2).sum(-1), torch.ones(50, 2))
    assert draws["effect"].shape == (50, 4) and draws["obs"].shape == (50, 20)
    torch.testing.assert_close(draws["scale_squared"], draws["sigma"] ** 2)


def test_median_and_quantiles_are_ordered_and_in_the_support():
    guide = AutoFlow(constrained_model, flow="iaf")
    fit(constrained_model, guide, DATA, steps=10)
    median = guide.median(DATA)
    quantiles = guide.quantiles([0.05, 0.5, 0.95], DATA)
    assert set(median) == set(quantiles) == {"sigma", "rho", "weights", "chol", "cuts", "free", "effect"}
    assert median["effect"].shape == (4,) and quantiles["effect"].shape == (3, 4)
    assert (quantiles["sigma"].diff(dim=0) > 0).all() and median["sigma"] > 0
    # Per coordinate in unconstrained space, mapped to each support: every quantile is a point of it.
    for values in (median, *(dict(zip(quantiles, level)) for level in zip(*quantiles.values()))):
        torch.testing.assert_close(values["weights"].sum(-1), torch.tensor(1.0))
        torch.testing.assert_close(values["chol"].pow(2).sum(-1), torch.ones(2))
        assert (values["cuts"].diff() > 0).all() and -1 < values["rho"] < 1
    # Fixed draws: the same on every call, and the median is the 0.5 quantile.
    for name, value in guide.median(DATA).items():
        assert torch.equal(value, median[name]) and torch.equal(value, quantiles[name][1])


def test_median_of_a_known_lognormal():
    """A trained flow's median is a Monte Carlo estimate of the true one, not the base's location."""

    def model():
        pyro.sample("x", dist.LogNormal(1.0, 0.5))

    guide = AutoFlow(model, flow="planar*4")
    fit(model, guide, steps=1500, lr=2e-2, elbo=Trace_ELBO(num_particles=8, vectorize_particles=True))
    torch.testing.assert_close(guide.median()["x"], torch.tensor(1.0).exp(), atol=0.15, rtol=0)


def test_get_transform_is_one_transform_consistent_with_log_prob():
    """Pyro's NeuTraReparam and other tools expect get_transform() to be a single Transform."""
    guide = AutoFlow(constrained_model, flow="sylvester*2+planar", base="fullrank")
    fit(constrained_model, guide, DATA, steps=3)
    transform = guide.get_transform()
    assert isinstance(transform, torch.distributions.Transform)
    noise = torch.randn(5, guide.latent_dim)
    latent = transform(noise)
    expected = guide.get_base_dist().log_prob(noise) - transform.log_abs_det_jacobian(noise, latent)
    # A fresh copy of the latent defeats every cache, so the posterior inverts the whole chain.
    torch.testing.assert_close(guide.get_posterior().log_prob(latent.clone()), expected, atol=1e-4, rtol=1e-5)


def test_neutra_reparam_runs_nuts_through_the_flow():
    from pyro.infer import MCMC, NUTS
    from pyro.infer.reparam import NeuTraReparam

    def model():
        x1 = pyro.sample("x1", dist.Normal(0.0, 2.0))
        pyro.sample("x2", dist.Normal(0.5 * x1**2, 1.0))

    guide = AutoFlow(model, flow="planar*2")
    fit(model, guide, steps=200, lr=3e-2)
    neutra = NeuTraReparam(guide.requires_grad_(False))
    mcmc = MCMC(NUTS(poutine.reparam(model, config=lambda _: neutra)), num_samples=20, warmup_steps=20, disable_progbar=True)
    mcmc.run()
    # NeuTraReparam names the shared latent after the first site it reparametrises.
    samples = neutra.transform_sample(mcmc.get_samples()["x1_shared_latent"])
    assert samples["x1"].shape == samples["x2"].shape == (20,)
    assert torch.isfinite(samples["x2"]).all()


def test_prior_init_respects_init_loc_fn():
    def model():
        pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.LogNormal(0.0, 1.0))

    values = {"a": torch.tensor(5.0), "b": torch.tensor(2.0)}
    guide = AutoFlow(model, flow="radial", init="prior", init_loc_fn=init_to_value(values=values))
    guide()
    assert guide.init_used == "prior"
    torch.testing.assert_close(guide.centre, torch.tensor([5.0, torch.tensor(2.0).log().item()]))


def gaussian_model():
    # Correlation 0.95 between the first two coordinates, scales 2, 1 and 0.11.
    scale_tril = torch.tensor([[2.0, 0.0, 0.0], [0.95, 0.3122, 0.0], [0.0, 0.05, 0.1]])
    covariance = scale_tril @ scale_tril.T
    pyro.sample("x", dist.MultivariateNormal(torch.tensor([1.0, -2.0, 3.0]), covariance))
    return covariance


@pytest.mark.parametrize("init", ["laplace", "auto"])
def test_laplace_init_matches_the_analytic_gaussian(init):
    guide = AutoFlow(gaussian_model, flow="sylvester*2+iaf", base="fullrank", init=init)
    guide()
    assert guide.init_used == "laplace"
    covariance = gaussian_model()
    with torch.no_grad():
        scale_tril = guide.preconditioner * guide.scale
        torch.testing.assert_close(guide.centre + guide.preconditioner @ guide.loc, torch.tensor([1.0, -2.0, 3.0]), atol=1e-4, rtol=0)
        torch.testing.assert_close(scale_tril @ scale_tril.T, covariance, atol=1e-4, rtol=1e-3)
    # The flow starts near the identity, so the guide starts near the exact posterior.
    draws = guide.sample_constrained(20000)["x"]
    torch.testing.assert_close(draws.T.cov(), covariance, atol=0.1, rtol=0.05)


def test_auto_init_keeps_the_prior_point_where_the_mode_misleads():
    """Neal's funnel: the joint mode sits deep in the neck (y ~ -40), far from the posterior mass."""
    from vi_flows.models import funnel

    guide = AutoFlow(funnel.model, init="auto")
    guide()
    assert guide.init_used == "prior"


def test_laplace_falls_back_with_a_warning_at_a_saddle():
    from vi_flows.models import gaussian_mixture

    guide = AutoFlow(gaussian_mixture.model, init="laplace")
    with pytest.warns(UserWarning, match="Laplace initialisation failed"):
        guide()
    assert guide.init_used == "prior"


def test_auto_init_falls_back_to_the_prior_point_without_a_warning():
    from vi_flows.models import gaussian_mixture

    guide = AutoFlow(gaussian_mixture.model, init="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guide()
    assert guide.init_used == "prior"


def test_state_dict_round_trip_gives_the_same_samples():
    guide = AutoFlow(constrained_model, flow="sylvester*2+iaf")
    fit(constrained_model, guide, DATA, steps=10)
    buffer = io.BytesIO()
    torch.save(guide.state_dict(), buffer)
    buffer.seek(0)

    pyro.clear_param_store()
    restored = AutoFlow(constrained_model, flow="sylvester*2+iaf")
    restored(DATA)
    restored.load_state_dict(torch.load(buffer))
    pyro.set_rng_seed(3)
    expected = guide(DATA)
    pyro.set_rng_seed(3)
    actual = restored(DATA)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0)


def test_a_used_guide_can_be_copied_and_saved_whole():
    guide = AutoFlow(constrained_model, flow="planar*2+iaf")
    fit(constrained_model, guide, DATA, steps=3)  # leaves autograd graphs in the flows' caches
    copied = copy.deepcopy(guide)
    buffer = io.BytesIO()
    torch.save(guide, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    pyro.set_rng_seed(3)
    expected = guide.get_posterior(DATA).sample((5,))
    for other in (copied, loaded):
        pyro.set_rng_seed(3)
        torch.testing.assert_close(other.get_posterior(DATA).sample((5,)), expected, rtol=0, atol=0)


def _frozen_log_prob(guide, draw):
    """log q(draw) with the parameters held fixed (a frozen copy), computed through the flow's exact inverse."""
    frozen = copy.deepcopy(guide)
    frozen.requires_grad_(False)
    return frozen.get_posterior().log_prob(draw)


def hierarchical_model():
    """A centred hierarchy: AutoFlow non-centres theta by mu and tau (``PartialNonCentring``)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    tau = pyro.sample("tau", dist.LogNormal(0.0, 1.0))
    with pyro.plate("groups", 3):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, 1.0), obs=torch.tensor([-1.0, 0.5, 2.0]))


@pytest.mark.parametrize(
    "model, flow",
    [
        (gaussian_model, "planar*2+iaf"),
        (gaussian_model, "householder*2+radial*2"),
        (gaussian_model, "sylvester-triangular*2"),
        (hierarchical_model, "planar*2+iaf"),
    ],
    ids=["planar-iaf", "householder-radial", "sylvester", "planar-iaf-non-centred"],
)
@pytest.mark.parametrize("base", ["standard", "diagonal", "fullrank"])
def test_sticking_the_landing_differentiates_log_q_only_through_the_draw(base, model, flow):
    guide = AutoFlow(model, flow=flow, base=base, init="prior")
    guide()
    guide.double()
    assert (model is hierarchical_model) == isinstance(guide.get_transform().parts[-1], PartialNonCentring)
    with torch.no_grad():
        for parameter in guide.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    posterior = guide.get_posterior()
    draw = posterior.rsample((6,))
    log_q = posterior.path_derivative_log_prob(draw)
    reference = _frozen_log_prob(guide, draw)
    torch.testing.assert_close(log_q, reference)
    parameters = list(guide.parameters())
    gradients = torch.autograd.grad(log_q.sum(), parameters, retain_graph=True, allow_unused=True, materialize_grads=True)
    expected = torch.autograd.grad(reference.sum(), parameters, allow_unused=True, materialize_grads=True)
    for name, gradient, wanted in zip(dict(guide.named_parameters()), gradients, expected):
        torch.testing.assert_close(gradient, wanted, msg=name)
    # At any other point (here a copy of the draw) the plain density is computed, through the inverse.
    torch.testing.assert_close(posterior.path_derivative_log_prob(draw.clone()), log_q)
    torch.testing.assert_close(posterior.log_prob(draw), log_q)


def _gaussian(dim):
    def model():
        pyro.sample("x", dist.Normal(torch.arange(dim, dtype=torch.float32), 2.0).to_event(1))

    return model


@pytest.mark.parametrize(
    "dim, sticking_the_landing, vanishes",
    [(3, True, True), (3, "auto", True), (3, False, False), (21, "auto", False), (21, True, True)],
)
def test_sticking_the_landing_gradient_vanishes_at_the_exact_posterior(dim, sticking_the_landing, vanishes):
    # The Laplace start is exact for a Gaussian model and a planar layer with u = 0 is the
    # identity, so q = p: every draw's path-derivative gradient is zero, the usual one is not.
    # "auto" takes the path derivative up to 20 dimensions (its cost grows with the flow's Jacobian).
    model = _gaussian(dim)
    guide = AutoFlow(model, flow="planar", init="laplace")
    guide()
    with torch.no_grad():
        guide.flow.u.zero_()
    loss = negative_elbo(model, guide, Particles(8, 0), sticking_the_landing=sticking_the_landing)
    gradients = torch.autograd.grad(loss, list(guide.parameters()), allow_unused=True, materialize_grads=True)
    norm = max(gradient.abs().max().item() for gradient in gradients)
    assert norm < 1e-3 if vanishes else norm > 0.1, norm
    # Its value is the ELBO's either way.
    pyro.set_rng_seed(0)
    plain = negative_elbo(model, guide, Particles(8, 0))
    pyro.set_rng_seed(0)
    torch.testing.assert_close(negative_elbo(model, guide, Particles(8, 0), sticking_the_landing=sticking_the_landing), plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_guide_follows_the_model_dtype_and_to_moves_every_parameter(dtype):
    def model():
        pyro.sample("x", dist.Normal(torch.zeros(3, dtype=dtype), 1.0).to_event(1))

    guide = AutoFlow(model, flow="householder+iaf", base="fullrank")
    assert guide()["x"].dtype == dtype
    assert all(p.dtype == dtype for p in guide.parameters())
    other = torch.float32 if dtype == torch.float64 else torch.float64
    guide.to(other)
    assert all(p.dtype == other for p in guide.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fits_on_gpu():
    def model():
        pyro.sample("x", dist.Normal(torch.zeros(3, device="cuda"), 1.0).to_event(1))

    guide = AutoFlow(model, flow="sylvester*2+iaf")
    guide()
    guide.to("cuda")
    losses = fit(model, guide, steps=5, elbo=Trace_ELBO(num_particles=4, vectorize_particles=True))
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert guide.median()["x"].device.type == "cuda"


class Regression(PyroModule):
    def __init__(self):
        super().__init__()
        self.linear = PyroModule[torch.nn.Linear](2, 1)
        self.linear.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, 2]).to_event(2))
        self.linear.bias = PyroSample(dist.Normal(0.0, 5.0).expand([1]).to_event(1))

    def forward(self, x, y=None):
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", dist.Normal(mean, sigma), obs=y)


def test_pyro_module_model_with_arguments():
    x = torch.randn(30, 2)
    y = x @ torch.tensor([1.0, -2.0]) + 0.5 + 0.1 * torch.randn(30)
    model = Regression()
    guide = AutoFlow(model, flow="iaf", init_scale=0.05)
    fit(model, guide, x, y, steps=800, lr=3e-2)
    median = guide.median(x, y)
    torch.testing.assert_close(median["linear.weight"], torch.tensor([[1.0, -2.0]]), atol=0.15, rtol=0)


def test_transform_fn_plugs_into_pyro_autonormalizingflow():
    def model():
        pyro.sample("x", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    guide = AutoNormalizingFlow(model, transform_fn("sylvester-triangular*2+planar"))
    losses = fit(model, guide, steps=5)
    assert all(map(torch.isfinite, map(torch.tensor, losses)))


def test_discrete_latent_site_is_named():
    def model():
        pyro.sample("coin", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="'coin' is discrete.*poutine.block.*enumeration.html"):
        AutoFlow(model)()


def test_subsampled_local_latents_are_refused_by_one_global_flow():
    """With local='none' a subsampled plate of latents is an error that names site and plate (the
    default gives them local posteriors: tests/test_local.py)."""

    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 100, subsample_size=10):
            pyro.sample("z", dist.Normal(mu, 1.0))

    with pytest.raises(ValueError, match="'z' lies in plate 'data', subsampled to 10 of 100"):
        AutoFlow(model, local="none")()


def test_subsampled_plate_with_only_global_latents_is_fine():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y), subsample_size=5) as index:
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=y[index])

    guide = AutoFlow(model, flow="planar")
    assert torch.isfinite(torch.tensor(fit(model, guide, torch.randn(50), steps=3))).all()


def test_model_without_latents_is_refused():
    def model():
        pyro.sample("obs", dist.Normal(0.0, 1.0), obs=torch.tensor(0.3))

    with pytest.raises(ValueError, match="no latent sample site"):
        AutoFlow(model)()


def test_bad_arguments_are_refused_at_construction():
    with pytest.raises(ValueError, match="base must be one of"):
        AutoFlow(constrained_model, base="gaussian")
    with pytest.raises(ValueError, match="unknown flow 'planr'"):
        AutoFlow(constrained_model, flow="planr*2")
    with pytest.raises(ValueError, match="init_scale must be positive"):
        AutoFlow(constrained_model, init_scale=0.0)


def test_log_density_at_reference_draws_includes_the_jacobian():
    """Laplace is exact for a log-normal in unconstrained space, so KL(p || q) = E_p[log p - log q] ~ 0;
    without the Jacobian of log x the estimate would be off by E[log x] = 1."""
    from vi_flows import log_density_at

    def model():
        pyro.sample("x", dist.LogNormal(1.0, 0.5))

    guide = AutoFlow(model, init="laplace")
    draws = {"x": dist.LogNormal(1.0, 0.5).sample((20000,))}
    kl_p_q = (dist.LogNormal(1.0, 0.5).log_prob(draws["x"]) - log_density_at(guide, draws)).mean()
    assert abs(kl_p_q) < 0.01


def test_log_density_at_punishes_a_guide_that_misses_mass():
    from vi_flows import log_density_at

    def model():
        pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    narrow = AutoFlow(model, init="prior", init_scale=0.1)
    exact = AutoFlow(model, init="laplace")
    draws = {"x": torch.randn(5000, 2)}
    assert log_density_at(narrow, draws).mean() < log_density_at(exact, draws).mean() - 40


def test_guide_moments_pool_chunks_into_the_moments_of_all_draws():
    from vi_flows import guide_moments, sample_constrained

    guide = AutoFlow(constrained_model, flow="planar*2", init="prior")
    guide(DATA)
    pyro.set_rng_seed(1)
    pooled = guide_moments(guide, 2500, DATA, chunk_size=1000)
    pyro.set_rng_seed(1)
    chunks = [sample_constrained(guide, size, DATA) for size in (1000, 1000, 500)]
    for name, (mean, sd) in pooled.items():
        draws = torch.cat([chunk[name] for chunk in chunks]).double()
        torch.testing.assert_close(mean, draws.mean(0))
        torch.testing.assert_close(sd, draws.std(0))
