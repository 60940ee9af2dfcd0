"""One optimisation step of ``fit``: the vectorised negative ELBO, compiled where it can be, its
gradient clipped, and an Adam update."""

import time
import warnings

import torch
from pyro.infer import Trace_ELBO
from pyro import poutine

from .compiled_elbo import CompileError, compile_negative_elbo
from .guides import trace_elbo_objective


class ELBOStep:
    """One optimisation step of ``fit``: the vectorised negative ELBO of ``model`` and ``guide``
    (with the path-derivative gradient where an ``AutoFlow``'s ``sticking_the_landing`` asks for it),
    its gradient clipped elementwise to ``[-clip_norm, clip_norm]`` (as Pyro's ``ClippedAdam``
    does) and an Adam update of every parameter that model and guide read.

    With ``compile=True`` the loss runs through :func:`~vi_flows.compiled_elbo.compile_negative_elbo`
    (raising :class:`~vi_flows.CompileError` where it cannot); with ``"auto"`` it
    falls back to Pyro's eager ``Trace_ELBO``, keeping the reason in ``compile_failure``.
    """

    def __init__(self, model, guide, *args, num_particles, max_plate_nesting, compile=False, clip_norm=10.0, **kwargs):
        elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=max_plate_nesting)

        def eager_loss():
            with trace_elbo_objective():  # the path-derivative gradient is unbiased for this loss
                return elbo.differentiable_loss(model, guide, *args, **kwargs)

        with poutine.trace(param_only=True) as param_capture:  # the parameters, found as Pyro's SVI finds them
            eager_loss()
        # Once each: Pyro's own flow guides store one tensor under two names (pyro issue 3132).
        unique = {}
        for site in param_capture.trace.nodes.values():
            param = site["value"].unconstrained()
            unique[id(param)] = param
        self.params = list(unique.values())
        if isinstance(guide, torch.nn.Module):
            untrained = [name for name, param in guide.named_parameters() if id(param) not in unique]
            if untrained:
                warnings.warn(
                    f"the guide's parameters {untrained} will not be trained: Pyro's param store holds other tensors "
                    "under their names, so the loss reads those. Was another guide of the same name created in this "
                    "param store before? Call pyro.clear_param_store() before creating this guide."
                )
        self.loss, self.compiled, self.compile_failure, self.compile_seconds = eager_loss, False, "", 0.0
        if compile:
            start = time.perf_counter()
            try:
                with trace_elbo_objective():  # what the graph holds is fixed here, when it is traced
                    self.loss = compile_negative_elbo(
                        model, guide, self.params, num_particles, max_plate_nesting, *args, **kwargs
                    )
                self.compiled = True
            except CompileError as failure:
                if compile is True:
                    raise
                self.compile_failure = str(failure)
            self.compile_seconds = time.perf_counter() - start
        self.clip_norm = clip_norm
        self.optimizer = torch.optim.Adam(self.params, fused=True)  # one kernel for all parameters

    def __call__(self, lr):
        """Take one step at learning rate ``lr``; return the loss before it."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.loss()
        loss.backward()
        torch.nn.utils.clip_grad_value_(self.params, self.clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.item()
