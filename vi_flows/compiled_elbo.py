"""The negative ELBO, and its trace into one graph of tensor operations.

At the sizes of most Bayesian models an SVI step spends its time in Python, not in arithmetic:
Pyro's tracing of model and guide, and the dispatch of each small tensor operation. Tracing the
loss once into a graph of tensor operations (``make_fx``) removes the first; compiling that graph
with the rest of the step (:mod:`vi_flows.compiled_step`) removes the second.
"""

import contextlib

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites
from torch.fx.experimental.proxy_tensor import make_fx

from .item_steps import TableReads
from .messages import first_line
from .particles import log_densities


class CompileError(RuntimeError):
    """The loss of this model and guide could not be traced or compiled; the message says why."""


def first_score_function_site(guide, *args, **kwargs):
    """The name of the first sample site of ``guide`` that is not reparameterised, or None."""
    with poutine.block(), poutine.trace() as guide_trace:
        guide(*args, **kwargs)
    for name, site in prune_subsample_sites(guide_trace.trace).iter_stochastic_nodes():
        if not site["fn"].has_rsample:
            return name
    return None


def is_subsampled(guide, *args, **kwargs):
    """Whether ``guide`` (and so the model, which replays it), or a model, reads a subsample of a plate."""
    with torch.no_grad(), poutine.block(), poutine.trace() as guide_trace:
        guide(*args, **kwargs)
    return any(
        frame.size != frame.full_size
        for site in guide_trace.trace.nodes.values()
        for frame in site.get("cond_indep_stack", ())
        if frame.full_size is not None
    )


def negative_elbo(model, guide, particles, *args, sticking_the_landing=False, control_variate=None, **kwargs):
    """Pyro's ``Trace_ELBO`` loss over ``particles`` (:class:`~vi_flows.particles.Particles`: how many
    draws, and how the model runs on them), written for guides whose sample sites are all
    reparameterised (no score-function terms): the mean over the guide's draws of log q - log p.
    Pyro's own ``differentiable_loss`` cannot be traced: it reads a Python number (``.item()``) per site.

    ``sticking_the_landing`` (``True``, ``False`` or ``"auto"``: up to
    :data:`~vi_flows.particles.STICKING_THE_LANDING_MAX_DIM` dimensions) scores each guide site whose
    distribution offers ``path_derivative_log_prob`` (an ``AutoFlow``'s) with it: the same value, its
    gradient through the draw alone, without the score term whose expectation is zero (Roeder, Wu &
    Duvenaud, "Sticking the Landing", NeurIPS 2017). Unbiased for this objective; with Renyi or
    importance-weighted objectives it would not be.

    ``control_variate`` (a :class:`~vi_flows.control_variates.LinearControlVariate`, or None) adds to
    each draw's log joint a term of expectation zero over the subsamples that cancels most of the
    subsample's noise in the globals' gradient.
    """
    reads = control_variate.reads() if control_variate is not None else contextlib.nullcontext()
    with reads:
        log_q, log_p = log_densities(model, guide, particles, *args, sticking_the_landing=sticking_the_landing, **kwargs)
    if control_variate is not None:
        log_p = log_p + reads.terms()
    return (log_q - log_p).mean()


def trace_negative_elbo(model, guide, params, particles, *args, sticking_the_landing=False, control_variate=None, item_tables=(), gradients=False, **kwargs):
    """:func:`negative_elbo` traced into a graph of tensor operations (``make_fx``): a
    ``GraphModule`` whose inputs are ``params`` (the unconstrained parameter tensors of model and
    guide, as Pyro's ``SVI`` collects them), so gradients reach them as in eager mode, and whose
    random draws stay in the graph, fresh at every call (the same draws as eager mode, uncompiled).
    Where the per-item tables among ``params`` (``item_tables``) are all read by the rows of one
    subsample, the graph also returns those rows and indices, as its ``table_rows`` says
    (:class:`~vi_flows.item_steps.TableRows`), so that a step can differentiate and update the rows alone.
    With ``gradients``, the graph returns instead the loss (detached) and its gradients, traced with
    it (:func:`loss_and_gradients`): tracing them from the loss's graph would take as long again.

    The graph reads a ``control_variate``'s tensors as they are at each call (refreshed in place).
    The model's Python control flow is fixed at tracing: a branch on a latent value cannot be traced
    and raises :class:`CompileError`, as does a parameter that does not reach the traced loss.
    """
    name = first_score_function_site(guide, *args, **kwargs)
    if name is not None:
        raise CompileError(f"guide site {name!r} is not reparameterised; its gradient needs score-function terms")
    table_rows = []

    def loss():
        with TableReads(item_tables) as reads:
            value = negative_elbo(model, guide, particles, *args, sticking_the_landing=sticking_the_landing, control_variate=control_variate, **kwargs)
        rows = reads.rows(params)
        if rows is not None:
            table_rows.append(rows[0])
        if gradients:
            return loss_and_gradients(value, rows, params)
        return value if rows is None else (value, *rows[1])

    try:
        # Validation branches on values; it ran in the eager evaluations before this one. make_fx
        # makes the very tensor objects it is given the graph's inputs, so the parameters that the
        # loss reads from Pyro's param store become inputs, not constants. Its trace runs for real:
        # autograd, which it records, keeps out what the loss computes without gradients.
        with pyro.validation_enabled(False), torch.enable_grad():
            graph = make_fx(lambda *_: loss())(*params)
    except Exception as failure:  # tracing raises many types; eager mode still works
        raise CompileError(f"could not trace the ELBO ({first_line(failure)})") from failure
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
    graph.table_rows = table_rows[0] if table_rows else None
    return graph


def loss_and_gradients(value, rows, params):
    """``(loss, *gradients, *indices)``: ``value`` detached and its gradient in each of ``params``
    (None where it does not depend on one). Where ``rows`` (``(TableRows, outputs)``, from
    :meth:`~vi_flows.item_steps.TableReads.rows`) says tables were read by the rows of a subsample,
    such a table's gradient is that of the rows read (a table read twice: both reads' rows), and the
    tables' indices follow the gradients, in the layout's order."""
    if rows is None:
        return (value.detach(), *torch.autograd.grad(value, params, allow_unused=True))
    layout, outputs = rows
    reads, indices = layout.split(outputs)
    dense = [position for position in range(len(params)) if position not in layout.positions]
    found = iter(torch.autograd.grad(value, [params[position] for position in dense] + [read for table in reads for read in table], allow_unused=True))
    gradients = [None] * len(params)
    for position in dense:
        gradients[position] = next(found)
    for position, table in zip(layout.positions, reads):
        gradients[position] = sum(next(found) for _ in table)
    return (value.detach(), *gradients, *indices)
