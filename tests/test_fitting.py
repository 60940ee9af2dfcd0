"""vi_flows.fit: the stopping rule, NaN protection, the compiled step and the result it reports."""

import importlib

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.reparam import LocScaleReparam
from vi_flows.models import reference_moments
from vi_flows.models._conjugate import ConjugateRegression

from vi_flows import AutoFlow, FittingError, fit, guide_moments
from vi_flows.compiled_elbo import CompileError
from vi_flows.diagnostics import (
    elbo_estimate,
    log_importance_weights,
    moment_errors,
    worst_moment_errors,
)
from vi_flows.elbo_step import ELBOStep
from vi_flows.schedule import has_converged
from vi_flows.zoo import load_model

# The funnel's x has kurtosis 3 exp(9): the worst sd of 10^7 exact draws was 1.7-3.4% off the truth
# (3 seeds), of 10^6 5-15.5% (6 seeds).
MOMENT_DRAWS = 10_000_000


def test_stopping_rule_stops_on_a_flat_noisy_trace_and_not_on_an_improving_one():
    # A one-sided two-standard-error rule calls ~2% of flat traces "still improving".
    flat_stops, improving_stops = 0, 0
    for seed in range(20):
        noise = torch.randn(2000, generator=torch.Generator().manual_seed(seed)).tolist()
        flat_stops += has_converged([10 + e for e in noise], window=500)
        improving_stops += has_converged([10 - 0.001 * step + e for step, e in enumerate(noise)], window=500)
        assert not has_converged(noise[:900], window=500)
    assert flat_stops >= 18
    assert improving_stops == 0


def test_fit_without_num_steps_stops_on_a_converged_problem():
    def model():
        pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    pyro.clear_param_store()
    result = fit(model, AutoFlow(model, flow="planar*2"), seed=0, progress=False, max_steps=6000, window=300)
    assert result.stop_reason.startswith("converged") and result.num_steps < 6000
    assert len(result.losses) == result.num_steps and result.seconds > 0
    assert result.averaged_steps >= 2 * 300  # it ends at the mean of its last rate's iterates


def test_fit_with_num_steps_runs_exactly_that_many():
    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0))

    pyro.clear_param_store()
    result = fit(model, AutoFlow(model, flow="radial"), num_steps=7, progress=False)
    assert result.num_steps == 7 and result.stop_reason == "reached num_steps"


@pytest.mark.parametrize("compile", [False, True])
def test_a_nan_loss_that_rolling_back_cannot_cure_names_the_step_and_restores_finite_parameters(compile):
    def model():
        x = pyro.sample("x", dist.ImproperUniform(dist.constraints.real, (), ()))
        # The density pulls x towards 5 but is undefined beyond 2: fitting must run into NaN.
        pyro.factor("pull", torch.where(x < 2, -0.5 * (x - 5) ** 2, torch.full_like(x, float("nan"))))

    pyro.clear_param_store()
    guide = AutoFlow(model, flow="planar", init_scale=0.01)
    with pytest.raises(FittingError, match=r"at step \d+; the guide's parameters are restored") as error:
        fit(model, guide, num_steps=5000, lr=5e-2, progress=False, seed=0, compile=compile, max_rollbacks=0)
    step = int(str(error.value).split("at step ")[1].split(";")[0])
    assert step > 0
    assert error.value.result.num_steps == step and len(error.value.result.losses) == step
    assert all(torch.isfinite(p).all() for p in guide.parameters())
    samples = guide.sample_constrained(100)["x"]
    assert torch.isfinite(samples).all()


# The banana ends in optima of KL 0.003-0.022 by seed (RESULTS.md, "Time to a good posterior"):
# worst mean error 0.016-0.101 and sd error 0.056-0.255 over the 26 seeds measured (b8b79d7, 2138727).
MEAN_TOLERANCE = {"banana": 0.15}
SD_TOLERANCE = {"banana": 0.3}


@pytest.mark.slow
@pytest.mark.parametrize(
    "target",
    [
        "regression_scaled",
        "autoregression",
        "correlated_gaussian",
        "gaussian_mixture",
        "banana",
        "funnel",
        "eight_schools",
        "hierarchical_100",
    ],
)
def test_default_fit_recovers_exact_posterior_moments(target, default_fit):
    """No learning rate, no step count: every mean within 0.1 sd and every sd within 10%, except the
    banana's (0.15 sd and 30%).

    The regression's coefficient sds span 1e-4 to 0.1; a fixed-rate loop on Pyro's full-rank guide
    misses its means by several sds (``python benchmarks/bench.py fit``). The banana's x2 sd, a fourth
    moment of x1, ended 0.80-0.94 of the truth over seeds 0-15 (``python benchmarks/bench.py choose``
    at b8b79d7, RESULTS.md): reverse-KL fits keep light tails, and the flow ends in optima of KL
    0.003-0.017 by seed, 8 of 16 beyond 10% in this sd. At 2138727 seed 0, on the compiled step's
    new random stream, drew the worst optimum seen (KL 0.022, mean error 0.101, sd error 0.255;
    seeds 1-8: 0.018-0.038 and 0.063-0.118).
    The centred funnel's x sds are set by its tails (84% of Var(x_i) comes from y > 6, 2.3% of the
    mass): AutoFlow's non-centring gives each x_i the scale exp(y / 2) there too; without it the
    default flow ends 0.62-0.66 of the truth. Its sds need ``MOMENT_DRAWS`` = 10^7 draws: the worst
    sd of 10^6 exact draws is up to 15% off. The centred hierarchies are scored against their exact
    moments by quadrature over tau.
    """
    module = importlib.import_module(f"vi_flows.models.{target}")
    guide, result = default_fit(target)
    assert result.stop_reason.startswith("converged")
    pyro.set_rng_seed(0)  # the funnel's sds from 10^7 draws still vary by a few % with the draws
    moments = guide_moments(guide, MOMENT_DRAWS if target == "funnel" else 100_000)
    worst_mean, worst_sd = worst_moment_errors(moment_errors(moments, reference_moments(module)))
    assert worst_mean < MEAN_TOLERANCE.get(target, 0.1), f"worst standardised mean error {worst_mean:.3f}"
    assert worst_sd < SD_TOLERANCE.get(target, 0.1), f"worst sd ratio error {worst_sd:.3f}"


@pytest.mark.slow
def test_default_fit_of_eight_schools_written_with_to_event_in_float64():
    """The centred eight schools with the schools as one ``.to_event(1)`` site, in float64, seed 5: before
    the divergence guard this fit sat at the optimum until step 5820, then its loss rose to 10^17 and it
    ended 355 nats worse (mean error 9.9 sd), with nothing said. Now every mean is within 0.1 sd and
    every sd within 10% of the exact moments, as on the 39 other fits measured (RESULTS.md)."""
    from vi_flows.models import eight_schools

    effects, standard_errors = eight_schools.EFFECTS.double(), eight_schools.STANDARD_ERRORS.double()

    def model():
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(torch.tensor(5.0, dtype=torch.float64)))
        theta = pyro.sample("theta", dist.Normal(mu.unsqueeze(-1).expand(mu.shape + (8,)), tau.unsqueeze(-1)).to_event(1))
        pyro.sample("y", dist.Normal(theta, standard_errors).to_event(1), obs=effects)

    pyro.clear_param_store()
    guide = AutoFlow(model)
    result = fit(model, guide, seed=5, progress=False)
    assert result.stop_reason.startswith("converged")
    pyro.set_rng_seed(0)
    moments = {name: (mean.double(), sd.double()) for name, (mean, sd) in eight_schools.posterior_moments().items()}
    worst_mean, worst_sd = worst_moment_errors(moment_errors(guide_moments(guide, 100_000), moments))
    assert worst_mean < 0.1 and worst_sd < 0.1, (worst_mean, worst_sd, result.rollbacks)


@pytest.mark.slow
def test_default_fit_of_the_non_centred_funnel_is_exact():
    """Non-centred with Pyro's ``LocScaleReparam``, the funnel's posterior over (y, x_decentered) is
    N(0, 3^2) x N(0, 1)^9, which the default flow reaches (KL < 0.0001, seeds 0-2), so the x = exp(y/2)
    x_decentered it implies has the funnel's heavy tails. (Here the model has no scale parent left, so
    AutoFlow adds no non-centring of its own.)"""
    funnel = load_model("funnel")
    model = poutine.reparam(funnel.model, config={"x": LocScaleReparam(0.0)})
    pyro.clear_param_store()
    guide = AutoFlow(model)
    fit(model, guide, seed=0, progress=False)
    log_weights = log_importance_weights(model, guide, num_samples=4096)
    elbo, standard_error = elbo_estimate(log_weights)
    assert funnel.LOG_Z - elbo < 0.001 + 3 * standard_error
    draws = guide.sample_constrained(20000)
    assert abs(draws["y"].std().item() / 3 - 1) < 0.02
    assert (draws["x_decentered"].std(0) - 1).abs().max() < 0.02


def test_sticking_the_landing_takes_true_false_or_auto():
    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0))

    pyro.clear_param_store()
    with pytest.raises(ValueError, match="sticking_the_landing must be True, False or 'auto', got 'yes'"):
        fit(model, AutoFlow(model), num_steps=1, progress=False, sticking_the_landing="yes")


def test_compiled_fit_recovers_a_correlated_gaussian():
    mean, covariance = torch.tensor([1.0, -2.0]), torch.tensor([[1.0, 0.9], [0.9, 4.0]])

    def model():
        pyro.sample("x", dist.MultivariateNormal(mean, covariance))

    pyro.clear_param_store()
    # The plain gradient: from this narrow start the path-derivative one needs more than 1500 steps
    # (RESULTS.md, "Sticking the landing").
    guide = AutoFlow(model, flow="householder", base="fullrank", init="prior")
    result = fit(model, guide, num_steps=1500, progress=False, seed=0, compile=True, sticking_the_landing=False)
    assert result.compiled and result.compile_failure == "" and 0 < result.compile_seconds < result.seconds
    draws = guide.sample_constrained(20000)["x"]
    sd = covariance.diagonal().sqrt()
    assert ((draws.mean(0) - mean).abs() / sd).max() < 0.05
    assert ((draws.std(0) / sd) - 1).abs().max() < 0.05


def branching_model():
    x = pyro.sample("x", dist.Normal(0.0, 1.0))
    if x.mean() > 3:  # Python reads a latent value: no single graph represents this model
        pyro.factor("tail", -x)


def test_compile_true_says_why_a_model_cannot_be_compiled():
    pyro.clear_param_store()
    with pytest.raises(CompileError, match="could not trace the ELBO .*data-dependent"):
        fit(branching_model, AutoFlow(branching_model, flow="planar"), num_steps=3, progress=False, compile=True)


def test_compile_auto_falls_back_to_eager_steps_and_says_why(monkeypatch):
    monkeypatch.setattr("vi_flows.fitting.COMPILE_MIN_STEPS", 1)
    pyro.clear_param_store()
    result = fit(branching_model, AutoFlow(branching_model, flow="planar"), num_steps=3, progress=False)
    assert not result.compiled and "data-dependent" in result.compile_failure
    assert result.num_steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))


def test_compile_auto_compiles_long_runs_only(monkeypatch):
    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0))

    pyro.clear_param_store()
    eager = fit(model, AutoFlow(model, flow="planar"), num_steps=3, progress=False)
    assert not eager.compiled and eager.compile_seconds == 0
    monkeypatch.setattr("vi_flows.fitting.COMPILE_MIN_STEPS", 3)
    pyro.clear_param_store()
    result = fit(model, AutoFlow(model, flow="planar"), num_steps=3, progress=False)
    assert result.compiled and result.compiled_from_step == 0


def test_a_guide_with_a_site_that_is_not_reparameterised_is_not_compiled():
    def model():
        pyro.sample("angle", dist.VonMises(0.0, 1.0))

    def guide():
        pyro.sample("angle", dist.VonMises(pyro.param("centre", torch.tensor(0.5)), 2.0))

    pyro.clear_param_store()
    with pytest.raises(CompileError, match="'angle' is not reparameterised"):
        fit(model, guide, num_steps=3, progress=False, compile=True)


def test_a_seeded_compiled_fit_is_reproducible():
    def model():
        pyro.sample("x", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    traces = []
    for _ in range(2):  # the second run compiles from PyTorch's cache
        pyro.clear_param_store()
        guide = AutoFlow(model, flow="planar*2", init="prior")
        traces.append(fit(model, guide, num_steps=20, progress=False, compile=True, seed=3).losses)
    assert traces[0] == traces[1]


def test_fit_warns_when_the_param_store_holds_another_guides_tensors():
    def model():
        pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    pyro.clear_param_store()
    fit(model, AutoFlow(model, flow="planar"), num_steps=2, progress=False)
    guide = AutoFlow(model, flow="planar")  # same name, same param store: Pyro reads the first guide's tensors
    with pytest.warns(UserWarning, match=r"\['flow.u', 'flow.w', 'flow.b'\] will not be trained"):
        fit(model, guide, num_steps=2, progress=False)


def _gaussian_fit_with_kicks(monkeypatch, kicks, **fit_options):
    """The default fit of a 2-D Gaussian whose parameters are thrown far off (``kicks[step]``
    added to every parameter, or NaN) before the given steps: a divergence on demand."""
    original = ELBOStep.__call__
    calls = []

    def kicked(self, lr):
        if len(calls) in kicks:
            with torch.no_grad():
                for param in self.params:
                    param.add_(kicks[len(calls)])
        calls.append(lr)
        return original(self, lr)

    monkeypatch.setattr(ELBOStep, "__call__", kicked)

    def model():
        pyro.sample("x", dist.Normal(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 2.0])).to_event(1))

    pyro.clear_param_store()
    guide = AutoFlow(model, flow="planar*2", init="laplace")  # starts at the posterior
    return guide, fit(model, guide, progress=False, seed=0, **{"compile": False, **fit_options}), calls


def _assert_close_to_the_posterior(guide):
    draws = guide.sample_constrained(20000)["x"]
    assert ((draws.mean(0) - torch.tensor([1.0, -2.0])).abs() / torch.tensor([0.5, 2.0])).max() < 0.05
    assert ((draws.std(0) / torch.tensor([0.5, 2.0])) - 1).abs().max() < 0.05


def test_the_default_fit_of_a_300_coefficient_regression_survives_its_warm_up():
    """With a MADE of 3D + 10 = 910 hidden units, each Adam step moved a unit's input by about 900
    times the learning rate: the loss rose from step 80 and turned NaN by step 100 (FittingError).
    The exact posterior is a Student-t whose joint mode (the Laplace start) is far off: KL 28.5."""
    target = ConjugateRegression.simulated(300)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoFlow(target.model)
    fit(target.model, guide, num_steps=300, seed=0, progress=False, compile=False)
    kl = target.log_z - elbo_estimate(log_importance_weights(target.model, guide, num_samples=1024))[0]
    assert kl < 6.0  # 4.2 measured; 28.5 at the start


def test_a_diverging_loss_rolls_back_to_the_best_parameters_and_cuts_the_rate(monkeypatch):
    guide, result, rates = _gaussian_fit_with_kicks(monkeypatch, {400: 3.0}, num_steps=800)
    assert len(result.rollbacks) == 1 and result.rollbacks[0].startswith("the median loss rose to")
    assert "over steps 401-500: restored the parameters of steps" in result.rollbacks[0]
    assert rates[500] == pytest.approx(0.2 * rates[499] * (0.1 ** (1 / 700)), rel=1e-6)  # cut once, at the rollback
    assert result.stop_reason == "reached num_steps" and result.num_steps == 800
    _assert_close_to_the_posterior(guide)


def test_a_nan_loss_after_the_first_block_rolls_back_instead_of_failing(monkeypatch):
    guide, result, _ = _gaussian_fit_with_kicks(monkeypatch, {400: float("nan")}, num_steps=800)
    assert len(result.rollbacks) == 1 and result.rollbacks[0].startswith("the loss was nan at step 400")
    assert result.num_steps == 799  # the NaN step is not in the trace
    _assert_close_to_the_posterior(guide)


def test_a_nan_loss_in_the_first_block_rolls_back_to_the_start(monkeypatch):
    """Before, it raised FittingError with the last finite step's parameters restored: the default
    fit of a 300-coefficient regression diverged so at the top of its warm-up, from a sound start."""
    guide, result, rates = _gaussian_fit_with_kicks(monkeypatch, {50: float("nan")}, num_steps=800)
    assert result.rollbacks == ["the loss was nan at step 50: restored the parameters of the start and cut the learning rate"]
    assert rates[51] == pytest.approx(0.2 * rates[50] * 52 / 51, rel=1e-6)  # cut, in the warm-up
    _assert_close_to_the_posterior(guide)


def test_parameters_left_nan_by_a_step_with_a_finite_loss_are_not_a_checkpoint(monkeypatch):
    """A NaN gradient leaves NaN parameters after a finite loss: checkpointed at the block's end,
    every rollback would restore them, and the fit would end in FittingError."""
    original = ELBOStep.__call__

    def step_leaving_nan(self, lr):
        loss = original(self, lr)
        step_leaving_nan.calls += 1
        if step_leaving_nan.calls == 100:  # the first block's last step
            with torch.no_grad():
                for param in self.params:
                    param.fill_(float("nan"))
        return loss

    step_leaving_nan.calls = 0
    monkeypatch.setattr(ELBOStep, "__call__", step_leaving_nan)
    guide, result, _ = _gaussian_fit_with_kicks(monkeypatch, {}, num_steps=800)
    assert result.rollbacks == ["the loss was nan at step 100: restored the parameters of the start and cut the learning rate"]
    _assert_close_to_the_posterior(guide)


def test_repeated_divergence_stops_at_the_best_parameters_with_a_warning(monkeypatch):
    kicks = {step: 3.0 for step in (400, 600, 800, 1000)}
    with pytest.warns(UserWarning, match=r"fit diverged: the median loss rose to .* after 2 rollbacks; stopped at the best"):
        guide, result, _ = _gaussian_fit_with_kicks(monkeypatch, kicks, num_steps=1200, max_rollbacks=2)
    assert len(result.rollbacks) == 2 and result.stop_reason.startswith("diverged") and result.num_steps == 900
    _assert_close_to_the_posterior(guide)


def test_fit_chooses_its_threads_and_restores_the_callers():
    from vi_flows.threads import fastest_threads

    def model():
        pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert fastest_threads(lambda: None) == 1  # nothing to share out: one thread
        pyro.clear_param_store()
        chosen = fit(model, AutoFlow(model, flow="planar"), num_steps=5, progress=False).num_threads
        assert chosen in (1, 2) and torch.get_num_threads() == 2
        pyro.clear_param_store()
        assert fit(model, AutoFlow(model, flow="planar"), num_steps=5, progress=False, threads=1).num_threads == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
