"""Compiling in a worker process: graphs sent node by node, the worker filling Inductor's cache
while the fit steps eagerly, and the fit switching to the compiled step at a fixed step."""

import os

import pyro
import pytest
import torch
from torch._dynamo.utils import counters

from vi_flows import AutoFlow, fit
from vi_flows.compile_worker import Compilation
from vi_flows.compiled_elbo import trace_negative_elbo
from vi_flows.elbo_step import EAGER_STEPS_WHILE_COMPILING, ELBOStep
from vi_flows.graph_transfer import fingerprint, pack, rebuilt
from vi_flows.pyro_internals import max_plate_nesting
from vi_flows.zoo import load_model


def _loss_graph(data_shift=0.0, flow="planar"):
    """The banana's traced negative ELBO under ``flow``, and the parameters it takes."""
    module = load_model("banana")
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoFlow(module.model, flow=flow, init="prior")
    step = ELBOStep(module.model, guide, num_particles=8, max_plate_nesting=max_plate_nesting(module.model, guide))
    shift = torch.tensor(data_shift)

    def model():  # a constant the graph holds, to change
        pyro.factor("shift", shift * 1.0)
        module.model()

    return trace_negative_elbo(model, guide, step.params, step.particles), step.params


@pytest.fixture
def empty_inductor_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))


def test_a_graph_rebuilt_from_its_bytes_computes_what_was_sent():
    graph, params = _loss_graph()
    copy, _ = rebuilt(graph)
    values = []
    for run in (graph, copy):
        pyro.set_rng_seed(3)  # the same draws: random operations are sent as calls, not as frozen results
        value = run(*params)
        values.append((value, torch.autograd.grad(value, params)))
    assert torch.equal(values[0][0], values[1][0])
    assert all(torch.equal(a, b) for a, b in zip(values[0][1], values[1][1]))


def test_the_fingerprint_is_the_steps_own():
    (graph, params), (again, _), (shifted, _) = _loss_graph(), _loss_graph(), _loss_graph(data_shift=1.0)
    (wider, wider_params) = _loss_graph(flow="planar*2")
    first = fingerprint([graph], params, 1)
    assert fingerprint([again], params, 1) == first  # another trace of the same step
    assert fingerprint([shifted], params, 1) == first  # a constant's value: an input of the compiled code
    assert fingerprint([wider], wider_params, 1) != first  # another step
    assert fingerprint([graph], params, 2) != first  # compiled for other threads


def test_a_graph_of_other_calls_cannot_be_sent():
    graph = torch.fx.symbolic_trace(lambda x: torch.sin(x))
    with pytest.raises(ValueError, match="cannot send a graph that calls"):
        pack(graph)


def test_a_worker_fills_inductors_cache_and_the_compile_here_hits_it(empty_inductor_cache):
    graph, params = _loss_graph()
    inputs = [param.detach() for param in params]
    compilation = Compilation([(graph, inputs)], num_threads=1, in_background=True)
    assert compilation.in_background
    hits = counters["inductor"]["fxgraph_cache_hit"]
    (compiled,) = compilation.result()
    assert counters["inductor"]["fxgraph_cache_hit"] == hits + 1  # what the worker compiled
    assert not compilation.in_background and torch.isfinite(compiled(*inputs)).all()
    # Known now: the next compilation of this step is here and at once.
    assert not Compilation([(graph, inputs)], num_threads=1, in_background=True).in_background


def test_a_cold_fit_steps_eagerly_until_its_switch_step_then_compiled(empty_inductor_cache):
    model = load_model("banana").model

    def seeded_fit(compile):
        pyro.clear_param_store()
        guide = AutoFlow(model, flow="planar", init="prior")
        return fit(model, guide, num_steps=2000, seed=1, progress=False, compile=compile)

    cold = seeded_fit("background")
    assert cold.compiled and cold.compiled_from_step == EAGER_STEPS_WHILE_COMPILING and not cold.compile_failure
    eager = seeded_fit(False)
    # The first steps are the eager fit's own, to the last bit.
    assert cold.losses[:EAGER_STEPS_WHILE_COMPILING] == eager.losses[:EAGER_STEPS_WHILE_COMPILING]
    assert abs(sum(cold.losses[-200:]) - sum(eager.losses[-200:])) / 200 < 0.05  # both near the optimum
    warm = seeded_fit("background")
    assert warm.compiled_from_step == 0  # the cache holds the step now


def test_a_step_that_is_never_used_stops_its_worker(empty_inductor_cache):
    graph, params = _loss_graph()
    compilation = Compilation([(graph, [param.detach() for param in params])], num_threads=1, in_background=True)
    worker = compilation._worker
    compilation.stop()
    assert worker._process.poll() is not None and not os.path.exists(worker._path) and not compilation.in_background


def test_closing_a_step_can_let_its_worker_fill_the_cache(empty_inductor_cache):
    module = load_model("banana")

    def background_step():
        pyro.clear_param_store()
        guide = AutoFlow(module.model, flow="planar", init="prior")
        return ELBOStep(module.model, guide, num_particles=8, max_plate_nesting=max_plate_nesting(module.model, guide), compile="background")

    first = background_step()
    assert not first.compiled  # a worker compiles it
    first.close(wait=True)
    again = background_step()
    assert again.compiled and again.compiled_from_step == 0
