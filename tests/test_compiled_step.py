"""The compiled step: the traced negative ELBO, and the whole step (gradient, clip, Adam) as one graph."""

import copy
import functools
import logging
import threading

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch.fx.experimental.proxy_tensor import make_fx

from vi_flows import AutoFlow, fit, inductor
from vi_flows.compiled_elbo import CompileError, trace_negative_elbo
from vi_flows.compiled_step import CompiledAdamStep
from vi_flows.elbo_step import ELBOStep
from vi_flows.inductor import compile_graph
from vi_flows.pyro_internals import max_plate_nesting
from vi_flows.zoo import load_model

from test_local import grouped_data, latent_tau_model

# Plates and a subsampled-free hierarchy; ordered, simplex and positive sites; ImproperUniform + factor.
MODELS = ["funnel", "hierarchical_100", "ordinal_simplex", "gaussian_mixture"]


def _eager_step(module, num_particles=8, sticking_the_landing=False, clip_norm=10.0):
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    guide = AutoFlow(module.model, flow="planar*2+iaf", init="prior")
    nesting = max_plate_nesting(module.model, guide)
    step = ELBOStep(
        module.model,
        guide,
        num_particles=num_particles,
        max_plate_nesting=nesting,
        sticking_the_landing=sticking_the_landing,
        clip_norm=clip_norm,
    )
    return guide, nesting, step


def _traced(module, guide, step, sticking_the_landing=False, gradients=True):
    return trace_negative_elbo(module.model, guide, step.params, step.particles, sticking_the_landing=sticking_the_landing, gradients=gradients)


@pytest.mark.parametrize("sticking_the_landing", [False, True], ids=["elbo", "stl"])
@pytest.mark.parametrize("name", MODELS)
def test_traced_loss_and_gradient_equal_pyros_trace_elbo(name, sticking_the_landing):
    module = load_model(name)
    guide, nesting, step = _eager_step(module, sticking_the_landing=sticking_the_landing)
    graph = _traced(module, guide, step, sticking_the_landing, gradients=False)
    with_gradients = _traced(module, guide, step, sticking_the_landing)
    pyros = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=nesting)
    results = []
    for loss in (functools.partial(pyros.differentiable_loss, module.model, guide), step.loss, lambda: graph(*step.params)):
        pyro.set_rng_seed(0)  # the same draws
        value = loss()
        results.append((value, torch.autograd.grad(value, step.params)))
    pyro.set_rng_seed(0)
    results.append((lambda value, *gradients: (value, gradients))(*with_gradients(*step.params)))
    (pyro_value, pyro_grads), (eager, eager_grads), *traced_results = results
    assert torch.allclose(eager, pyro_value, rtol=1e-5)
    # The path-derivative gradient is the objective's own; without it all agree. The loss's graph
    # differentiated and the graph traced with its gradients give the eager gradients.
    for traced, traced_grads in traced_results:
        assert torch.allclose(traced, eager, rtol=1e-5)
        for traced_grad, eager_grad, pyro_grad in zip(traced_grads, eager_grads, pyro_grads, strict=True):
            assert torch.allclose(traced_grad, eager_grad, rtol=1e-4, atol=1e-5)
            assert sticking_the_landing or torch.allclose(eager_grad, pyro_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gradients", [False, True], ids=["loss", "with gradients"])
def test_parameters_the_traced_loss_does_not_read_are_refused(gradients):
    # Copies are not the tensors the loss reads: traced, they would be constants, never trained.
    module = load_model("banana")
    guide, nesting, step = _eager_step(module)
    copies = [param.detach().clone().requires_grad_() for param in step.params]
    with pytest.raises(CompileError, match=rf"parameters \[0, 1, .*\] \(of {len(copies)}\) do not reach the traced loss"):
        trace_negative_elbo(module.model, guide, copies, step.particles, gradients=gradients)


def _snapshot(step):
    return [param.detach().clone() for param in step.params], copy.deepcopy(step.optimizer.state_dict())


def _eager_and_one_graph_runs(step, graph, reduce=None):
    """Three steps of ``step`` (seeds 10-12; its control variate, where it has one, re-anchored after
    the first) from its current parameters, eagerly and through the whole step traced as one graph (``graph``: the loss traced with its gradients; with ``reduce``, two graphs and
    ``reduce`` between them, as data-parallel) with ``step``'s clip, per-item tables and noise clip:
    the start, then ``(losses, params, optimiser state)`` of each run."""
    start = [param.detach().clone() for param in step.params]
    runs = []
    for one_graph in (False, True):
        with torch.no_grad():
            torch._foreach_copy_(step.params, start)
        step.optimizer.state.clear()
        step.refresh()  # anchored at the start, in both runs
        take = step
        if one_graph:
            take = CompiledAdamStep(graph, step.params, step.optimizer, step.clip_norm, step.tables, step.subsampled, backend=None, reduce=reduce)
        losses = []
        for index in range(3):
            pyro.set_rng_seed(10 + index)
            losses.append(take(1e-2))
            if index == 0:  # re-anchored in place: the graph reads the new anchor and slopes
                step.refresh()
        runs.append((losses, *_snapshot(step)))
    return start, runs


@pytest.mark.parametrize("sticking_the_landing", [False, True], ids=["elbo", "stl"])
@pytest.mark.parametrize("name", MODELS)
def test_the_one_graph_step_takes_the_eager_steps_on_the_same_draws(name, sticking_the_landing):
    """Loss, clipped gradient (clip 0.5: some elements are clipped) and torch's Adam, in one traced
    graph: three steps from the same start on the same draws end where eager steps end."""
    module = load_model(name)
    guide, _, step = _eager_step(module, sticking_the_landing=sticking_the_landing, clip_norm=0.5)
    start, runs = _eager_and_one_graph_runs(step, _traced(module, guide, step, sticking_the_landing))
    (eager_losses, eager_params, eager_state), (losses, params, state) = runs
    assert losses == pytest.approx(eager_losses, rel=1e-6)
    for eager_param, param, first in zip(eager_params, params, start):
        assert (eager_param - first).abs().max() > 1e-3  # the steps moved it
        torch.testing.assert_close(param, eager_param, rtol=1e-4, atol=1e-6)
    for key, eager_entry in eager_state["state"].items():
        assert float(state["state"][key]["step"]) == float(eager_entry["step"]) == 3
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state["state"][key][moment], eager_entry[moment], rtol=1e-3, atol=1e-8)


@pytest.mark.parametrize("reduce", [None, lambda loss, gradients: (loss, gradients)], ids=["one graph", "two graphs"])
def test_the_one_graph_step_takes_the_eager_steps_with_lazy_tables_and_the_noise_clip(fresh_param_store, reduce):
    """On a subsampled plate: per-item tables stepped lazily and a clip that follows the noise (clip
    0.5: the noise bound is at work), in the graph as in eager steps; and in the two graphs of a
    data-parallel step (a reduce between them: here one rank's, the identity)."""
    data = grouped_data(1000)
    guide = AutoFlow(latent_tau_model, local="per-item")
    step = ELBOStep(latent_tau_model, guide, data, 50, num_particles=8, max_plate_nesting=2, sticking_the_landing=True, clip_norm=0.5, threads=1)
    assert step.subsampled and len(step.tables) == 2
    assert step.control_variate is not None  # the default on a subsampled plate
    graph = trace_negative_elbo(
        latent_tau_model, guide, step.params, step.particles, data, 50, sticking_the_landing=True, control_variate=step.control_variate, item_tables=step.tables, gradients=True
    )
    # The graph reads both tables by the subsample's rows: the step differentiates and updates those alone.
    tables = {id(table) for table in step.tables}
    assert sorted(graph.table_rows.positions) == [index for index, param in enumerate(step.params) if id(param) in tables]
    start, ((eager_losses, eager_params, eager_state), (losses, params, state)) = _eager_and_one_graph_runs(step, graph, reduce)
    assert losses == pytest.approx(eager_losses, rel=1e-6)
    for eager_param, param in zip(eager_params, params):
        torch.testing.assert_close(param, eager_param, rtol=1e-4, atol=1e-6)
    for key, eager_entry in eager_state["state"].items():
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state["state"][key][moment], eager_entry[moment], rtol=1e-3, atol=1e-8)
    assert any((eager_param - first).abs().max() > 1e-3 for eager_param, first in zip(eager_params, start))


def test_building_the_compiled_step_runs_nothing_and_draws_nothing():
    """Only the warm-up runs the step, on copies; only a real step moves the parameters."""
    module = load_model("banana")
    guide, _, step = _eager_step(module)
    step(1e-2)  # eager Adam has its state
    graph = _traced(module, guide, step)
    before = [param.detach().clone() for param in step.params], copy.deepcopy(step.optimizer.state_dict())
    rng_state = torch.get_rng_state()
    compiled = CompiledAdamStep(graph, step.params, step.optimizer, clip_norm=10.0)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert all(torch.equal(param, old) for param, old in zip(step.params, before[0]))
    state = step.optimizer.state_dict()["state"]
    assert all(torch.equal(state[key][name], value) for key, old in before[1]["state"].items() for name, value in old.items())
    compiled.warm_up()
    assert all(torch.equal(param, old) for param, old in zip(step.params, before[0]))
    assert isinstance(compiled(1e-2), float) and not torch.equal(step.params[0], before[0][0])


def test_compiled_step_loss_and_gradient_have_the_eager_means():
    """The compiled graph draws its own random numbers: compare means over many draws. With the
    learning rate 0 and Adam's state zeroed before each call, a step leaves the parameters where
    they are and its first moment is (1 - beta1) times the gradient."""
    module = load_model("banana")
    guide, _, step = _eager_step(module, num_particles=16)
    compiled = CompiledAdamStep(_traced(module, guide, step), step.params, step.optimizer, clip_norm=1e6)
    loc_state = lambda: step.optimizer.state[guide.loc]  # noqa: E731
    start = [param.detach().clone() for param in step.params]
    samples = [[], []]
    for _ in range(400):
        value = step.loss()
        samples[0].append(torch.cat([value.detach().reshape(1), torch.autograd.grad(value, guide.loc)[0]]))
        with torch.no_grad():
            for state in step.optimizer.state.values():
                torch._foreach_zero_([state["step"], state["exp_avg"], state["exp_avg_sq"]])
        value = compiled(0.0)
        samples[1].append(torch.cat([torch.tensor([value]), loc_state()["exp_avg"] / 0.1]))
    assert all(torch.equal(param, first) for param, first in zip(step.params, start))
    eager, graph = (torch.stack(values) for values in samples)
    standard_error = ((eager.var(0) + graph.var(0)) / len(eager)).sqrt()
    assert ((eager.mean(0) - graph.mean(0)).abs() < 4 * standard_error).all()


def test_a_compiled_fit_rolls_back_through_the_optimisers_saved_state(monkeypatch):
    """The guard restores Adam's state with ``load_state_dict``, which puts new tensors in it: the
    compiled step must go on updating those."""
    original = ELBOStep.__call__
    calls, steps = [], []

    def kicked(self, lr):
        steps[:] = [self]
        if len(calls) == 400:
            with torch.no_grad():
                for param in self.params:
                    param.add_(3.0)
        calls.append(lr)
        return original(self, lr)

    monkeypatch.setattr(ELBOStep, "__call__", kicked)

    def model():
        pyro.sample("x", pyro.distributions.Normal(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 2.0])).to_event(1))

    pyro.clear_param_store()
    guide = AutoFlow(model, flow="planar*2", init="laplace")
    result = fit(model, guide, num_steps=800, progress=False, seed=0, compile=True)
    assert result.compiled and len(result.rollbacks) == 1
    # A step after the rollback moves the moments the optimiser holds now, not those it held before.
    (step,) = steps
    before = [state["exp_avg"].clone() for state in step.optimizer.state.values()]
    original(step, 1e-3)
    assert all(not torch.equal(old, state["exp_avg"]) for old, state in zip(before, step.optimizer.state.values()))
    draws = guide.sample_constrained(20000)["x"]
    assert ((draws.mean(0) - torch.tensor([1.0, -2.0])).abs() / torch.tensor([0.5, 2.0])).max() < 0.05
    assert ((draws.std(0) / torch.tensor([0.5, 2.0])) - 1).abs().max() < 0.05


def test_compiling_a_triangular_solve_shows_the_user_no_warning():
    """On the CPU Inductor's C++ wrapper calls the flows' triangular solves through PyTorch's
    dispatcher and logs a warning for each at every compile: kept from the user, whom it does not concern."""
    matrix, right = torch.tensor([[1.0, 0.0], [0.5, 2.0]]), torch.randn(3, 2, 1)
    graph = make_fx(lambda matrix, right: torch.linalg.solve_triangular(matrix, right, upper=False))(matrix, right)
    shown = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = shown.append  # what reaches torch's handlers (stderr), filtered
    logger = logging.getLogger("torch._inductor")
    logger.addHandler(handler)
    try:  # lowered here, not read from a cache that a run of the suite before this one filled
        with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
            solve = compile_graph(graph, [matrix, right], num_threads=1)
    finally:
        logger.removeHandler(handler)
    torch.testing.assert_close(solve(matrix, right), torch.linalg.solve_triangular(matrix, right, upper=False))
    assert [record.getMessage() for record in shown] == []


def test_compiling_waits_for_the_cpu_probe_only_where_inductor_asks_for_its_answer(monkeypatch):
    """Inductor's probe of the CPU's vector instructions (7 s of g++ with an empty cache) runs in a
    thread: compiling starts beside it and takes its answer once it is there, never probing twice."""
    events, release = [], threading.Event()

    def slow_probe():
        release.wait(timeout=30)
        events.append("probe done")

    def recorded(function, name):
        def run(*args, **kwargs):
            events.append(name)
            release.set()
            return function(*args, **kwargs)

        return run

    asked = torch._inductor.cpu_vec_isa.valid_vec_isa_list
    probe = threading.Thread(target=slow_probe)
    probe.start()
    monkeypatch.setattr(inductor, "_cpu_probe", probe)
    monkeypatch.setattr(inductor, "compile_fx", recorded(inductor.compile_fx, "compiling"))
    monkeypatch.setattr(inductor, "_probed_vec_isas", recorded(inductor._probed_vec_isas, "answer taken"))
    x = torch.randn(64, 3)
    graph = make_fx(lambda x: (x.exp() * 2).sum(0))(x)
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        kernel = compile_graph(graph, [x], num_threads=1)
    torch.testing.assert_close(kernel(x), (x.exp() * 2).sum(0))
    assert events[:3] == ["compiling", "probe done", "answer taken"]
    assert torch._inductor.cpu_vec_isa.valid_vec_isa_list is asked  # Inductor's own, put back
