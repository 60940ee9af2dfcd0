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
from pyro.poutine.util import prune_subsample_sites
from torch.fx.experimental.proxy_tensor import make_fx


class CompileError(RuntimeError):
    """The loss of this model and guide could not be traced or compiled; the message says why."""


def _first_line(failure):
    message = str(failure).strip()
    return f"{type(failure).__name__}: {message.splitlines()[0]}" if message else type(failure).__name__


def negative_elbo(model, guide, num_particles, max_plate_nesting, *args, **kwargs):
    """Pyro's vectorised ``Trace_ELBO`` loss, written for guides whose sample sites are all
    reparameterised (no score-function terms): particles in an outermost plate, the model
    replayed on the guide's draws, and the difference of the traces' log densities. Pyro's own
    ``differentiable_loss`` cannot be traced: it reads a Python number (``.item()``) per site."""
    with pyro.plate("num_particles_vectorized", num_particles, dim=-(max_plate_nesting + 1)):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return (guide_trace.log_prob_sum() - model_trace.log_prob_sum()) / num_particles


def compile_negative_elbo(model, guide, params, num_particles, max_plate_nesting, *args, backend="inductor", **kwargs):
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
    with poutine.block(), poutine.trace() as guide_trace:
        guide(*args, **kwargs)
    for name, site in prune_subsample_sites(guide_trace.trace).iter_stochastic_nodes():
        if not site["fn"].has_rsample:
            raise CompileError(f"guide site {name!r} is not reparameterised; its gradient needs score-function terms")

    def loss():
        return negative_elbo(model, guide, num_particles, max_plate_nesting, *args, **kwargs)

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
