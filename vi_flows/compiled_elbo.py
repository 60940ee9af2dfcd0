"""The negative ELBO as one compiled tensor program, which is what makes a ``fit`` step cheap.

At the sizes of most Bayesian models an SVI step spends its time in Python, not in arithmetic:
Pyro's tracing of model and guide, and the dispatch of each small tensor operation. Tracing the
loss once into a graph of tensor operations (``make_fx``) removes the first; compiling that graph
(``torch.compile``, which fuses the operations of forward and backward pass) removes the second.
"""

import warnings

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import prune_subsample_sites
from torch.fx.experimental.proxy_tensor import make_fx

# sticking_the_landing="auto" uses the path-derivative gradient up to this many dimensions of a
# guide site. Measured with fit's compiled step, 64 particles (python benchmarks/bench.py stl): a step
# costs 2.2x / 2.9x / 4.4x / 15.3x the plain one at D = 2 / 10 / 20 / 50 (the flow's D x D Jacobian).
STICKING_THE_LANDING_MAX_DIM = 20


class CompileError(RuntimeError):
    """The loss of this model and guide could not be traced or compiled; the message says why."""


def _first_line(failure):
    message = str(failure).strip()
    return f"{type(failure).__name__}: {message.splitlines()[0]}" if message else type(failure).__name__


def first_score_function_site(guide, *args, **kwargs):
    """The name of the first sample site of ``guide`` that is not reparameterised, or None."""
    with poutine.block(), poutine.trace() as guide_trace:
        guide(*args, **kwargs)
    for name, site in prune_subsample_sites(guide_trace.trace).iter_stochastic_nodes():
        if not site["fn"].has_rsample:
            return name
    return None


def negative_elbo(model, guide, num_particles, max_plate_nesting, *args, sticking_the_landing=False, **kwargs):
    """Pyro's vectorised ``Trace_ELBO`` loss, written for guides whose sample sites are all
    reparameterised (no score-function terms): particles in an outermost plate, the model
    replayed on the guide's draws, and the difference of the traces' log densities. Pyro's own
    ``differentiable_loss`` cannot be traced: it reads a Python number (``.item()``) per site.

    ``sticking_the_landing`` (``True``, ``False`` or ``"auto"``: up to ``STICKING_THE_LANDING_MAX_DIM``
    dimensions) scores each guide site whose distribution offers ``path_derivative_log_prob`` (an
    ``AutoFlow``'s) with it: the same value, its gradient through the draw alone, without the score
    term whose expectation is zero (Roeder, Wu & Duvenaud, "Sticking the Landing", NeurIPS 2017).
    Unbiased for this objective; with Renyi or importance-weighted objectives it would not be.
    """
    with pyro.plate("num_particles_vectorized", num_particles, dim=-(max_plate_nesting + 1)):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    path_sites = {
        name: site
        for name, site in guide_trace.iter_stochastic_nodes()
        if _uses_path_derivative(site["fn"], sticking_the_landing)
    }
    log_q = guide_trace.log_prob_sum(site_filter=lambda name, site: name not in path_sites)
    for site in path_sites.values():
        log_q = log_q + scale_and_mask(site["fn"].path_derivative_log_prob(site["value"]), site["scale"], site["mask"]).sum()
    return (log_q - model_trace.log_prob_sum()) / num_particles


def _uses_path_derivative(fn, sticking_the_landing):
    if not sticking_the_landing or not hasattr(fn, "path_derivative_log_prob"):
        return False
    return sticking_the_landing is True or fn.event_shape.numel() <= STICKING_THE_LANDING_MAX_DIM


def compile_negative_elbo(
    model, guide, params, num_particles, max_plate_nesting, *args, backend="inductor", sticking_the_landing=False, **kwargs
):
    """Return a function of no arguments computing :func:`negative_elbo` through a compiled graph.

    The loss is traced once with ``params`` (the unconstrained parameter tensors of model and
    guide, as Pyro's ``SVI`` collects them) as the graph's inputs, so gradients reach them as in
    eager mode, and the guide's random draws stay in the graph, fresh at every call. The model's
    Python control flow is fixed at tracing: a branch on a latent value cannot be traced and
    raises :class:`CompileError`, as do a parameter that does not reach the traced loss and any
    failure of the compiler. The graph is run once, forward and backward, before it is returned;
    the gradients of that run are discarded.
    ``backend=None`` returns the traced graph uncompiled (same random draws as eager mode).
    """
    name = first_score_function_site(guide, *args, **kwargs)
    if name is not None:
        raise CompileError(f"guide site {name!r} is not reparameterised; its gradient needs score-function terms")

    def loss():
        return negative_elbo(
            model, guide, num_particles, max_plate_nesting, *args, sticking_the_landing=sticking_the_landing, **kwargs
        )

    try:
        # Validation branches on values; it ran in the eager evaluations before this one. make_fx
        # makes the very tensor objects it is given the graph's inputs, so the parameters that the
        # loss reads from Pyro's param store become inputs, not constants.
        with pyro.validation_enabled(False):
            graph = make_fx(lambda *_: loss())(*params)
    except Exception as failure:  # tracing raises many types; eager mode still works
        raise CompileError(f"could not trace the ELBO ({_first_line(failure)})") from failure
    inputs = [node for node in graph.graph.nodes if node.op == "placeholder"]
    detached = [index for index, node in enumerate(inputs) if not node.users]
    if detached:
        # The loss read these parameters through other tensor objects (copies, values cached
        # across calls): the graph holds those as constants, so they would never be trained.
        raise CompileError(
            f"parameters {detached} (of {len(params)}) do not reach the traced loss: model or guide read other "
            "tensors than the param store holds under their names (two guides of one name in the param store? "
            "pyro.clear_param_store() between them)"
        )
    try:
        compiled = graph if backend is None else torch.compile(graph, backend=backend, fullgraph=True, dynamic=False)
        with warnings.catch_warnings():
            # The compiler's own deprecation notices say nothing about the user's model.
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\._inductor")
            compiled(*params).backward()  # torch.compile compiles at the first call
    except Exception as failure:  # the compilers raise many types; eager mode still works
        raise CompileError(f"could not compile the ELBO ({_first_line(failure)})") from failure
    finally:
        for param in params:
            param.grad = None
    return lambda: compiled(*params)
