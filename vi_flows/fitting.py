"""``fit``: run SVI with clipping, a decaying learning rate, a stopping rule and NaN protection."""

import math
import time
import warnings
from dataclasses import dataclass, field

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from tqdm import tqdm

from .compiled_elbo import CompileError, compile_negative_elbo
from .diagnostics import max_plate_nesting
from .guides import trace_elbo_objective

# compile="auto" compiles runs of at least this many steps. Measured on 2 CPU cores: compiling
# takes 5-18 s the first time (about 1 s from PyTorch's cache) and saves 2-9 ms per step
# (python -m vi_flows.bench speed), so such a run repays it.
COMPILE_MIN_STEPS = 2000


class FittingError(RuntimeError):
    """The loss became NaN or infinite; the guide holds the last parameters with a finite loss.

    ``result`` is the :class:`FitResult` up to that step, so the loss trace is not lost.
    """

    def __init__(self, message, result):
        super().__init__(message)
        self.result = result


@dataclass
class FitResult:
    """What a call to :func:`fit` did: the loss per step, how long it ran (``seconds``, compiling
    included), why it stopped, whether its steps ran compiled, how long compiling took and, where
    it was tried and failed, why. ``(seconds - compile_seconds) / num_steps`` is the time per step."""

    losses: list = field(default_factory=list)
    num_steps: int = 0
    seconds: float = 0.0
    stop_reason: str = ""
    compiled: bool = False
    compile_seconds: float = 0.0
    compile_failure: str = ""


def has_converged(losses, window):
    """True when the mean loss of the last ``window`` steps is no lower than that of the window
    before by more than two standard errors of the difference: the ELBO has stopped improving."""
    if len(losses) < 2 * window:
        return False
    previous = torch.tensor(losses[-2 * window : -window])
    last = torch.tensor(losses[-window:])
    standard_error = math.sqrt((previous.var() + last.var()).item() / window)
    return (previous.mean() - last.mean()).item() < 2 * standard_error


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


def fit(
    model,
    guide,
    *args,
    num_steps=None,
    lr=1e-2,
    num_particles=64,
    seed=None,
    progress=True,
    compile="auto",
    max_steps=20000,
    window=1000,
    warmup_steps=100,
    plateau_factor=0.2,
    num_plateaus=3,
    final_lr_fraction=0.1,
    clip_norm=10.0,
    **kwargs,
):
    """Fit ``guide`` to ``model(*args, **kwargs)`` by SVI with vectorised ``Trace_ELBO`` particles.

    The learning rate warms up linearly over ``warmup_steps``. With ``num_steps`` fitting runs
    exactly that many steps, the rate then decaying geometrically to ``final_lr_fraction * lr``.
    Without, it decays on plateaus: whenever :func:`has_converged` says a ``window`` of steps did
    not improve on the one before, the rate is multiplied by ``plateau_factor``, and fitting stops
    at the ``num_plateaus``-th plateau (or at ``max_steps``). The optimiser is Adam with every
    gradient element clipped to ``[-clip_norm, clip_norm]`` (what Pyro's ``ClippedAdam`` does).

    ``num_particles`` defaults to 64: on the zoo's small and medium models a vectorised step costs
    about the same with 64 particles as with 8 (Python overhead dominates), and the less noisy
    gradient lowers the KL reached by the default flow 3-9x on the banana, the funnel, the
    correlated Gaussian and the mixture. For models with large data sets, fewer particles are cheaper.
    ``window`` defaults to 1000 steps: with 500 the rule declared plateaus while the banana was
    still improving slowly (KL 0.10 at the stop against 0.010 with 1000), at twice the fitting time.

    ``compile``: with ``True`` the loss is traced into one graph and compiled with
    ``torch.compile`` (see :func:`~vi_flows.compiled_elbo.compile_negative_elbo`): a step then
    costs 0.15-0.5x an eager one, after 5-35 s of compiling (less from PyTorch's cache). This
    needs a guide whose sites are all reparameterised (every autoguide of continuous latents) and
    a model whose control flow does not branch on latent values. ``"auto"`` compiles runs of
    ``COMPILE_MIN_STEPS`` steps or more and steps eagerly, through Pyro's ``Trace_ELBO``, where
    compiling fails (the result's ``compile_failure`` says why); ``True`` raises
    :class:`~vi_flows.CompileError` instead; ``False`` never compiles.

    The loss is ``Trace_ELBO``'s, so an ``AutoFlow`` left at ``sticking_the_landing="auto"`` takes
    the path-derivative gradient here, up to 20 latent dimensions (see :class:`~vi_flows.AutoFlow`).

    If a loss is NaN or infinite, fitting stops, the parameters of the last finite step are
    restored and :class:`FittingError` names the step.
    """
    if compile not in (True, False, "auto"):
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
    if seed is not None:
        pyro.set_rng_seed(seed)
    budget = num_steps if num_steps is not None else max_steps
    if compile == "auto" and budget < COMPILE_MIN_STEPS:
        compile = False  # too few steps to repay the seconds of compiling
    result = FitResult()
    start = time.perf_counter()
    # Counting plates up front also sets the guide up, and keeps Pyro from logging its guess.
    nesting = max_plate_nesting(model, guide, *args, **kwargs)
    step_once = ELBOStep(
        model,
        guide,
        *args,
        num_particles=num_particles,
        max_plate_nesting=nesting,
        compile=compile,
        clip_norm=clip_norm,
        **kwargs,
    )
    result.compiled, result.compile_seconds = step_once.compiled, step_once.compile_seconds
    result.compile_failure = step_once.compile_failure
    params = step_once.params
    plateaus, last_plateau = 0, 0

    def learning_rate(step):
        warm = min(1.0, (step + 1) / warmup_steps)
        if num_steps is not None:
            return lr * warm * final_lr_fraction ** (max(step - warmup_steps, 0) / max(num_steps - warmup_steps, 1))
        return lr * warm * plateau_factor**plateaus

    # Parameters before the previous step and before this one: a step whose loss is finite can
    # still leave NaN parameters behind (a NaN gradient), so a NaN loss at step t restores the
    # parameters step t - 1 started from, the last ones known to give a finite loss.
    before_previous = [torch.empty_like(param) for param in params]
    before_this = [torch.empty_like(param) for param in params]
    bar = tqdm(total=budget, disable=not progress, desc="fit", unit="step", mininterval=1.0)
    try:
        for step in range(budget):
            before_previous, before_this = before_this, before_previous
            with torch.no_grad():
                for saved, param in zip(before_this, params):
                    saved.copy_(param)
            try:
                loss_value = step_once(learning_rate(step))
            except ValueError as error:
                # With validation on (Pyro's default), NaNs surface as invalid distribution arguments.
                if "nan" not in str(error):
                    raise
                loss_value = float("nan")
            if not math.isfinite(loss_value):
                with torch.no_grad():
                    for param, saved in zip(params, before_previous if step > 0 else before_this):
                        param.copy_(saved)
                result.stop_reason = f"loss was {loss_value} at step {step}"
                raise FittingError(
                    f"the loss became {loss_value} at step {step}; the guide's parameters are restored to "
                    "those of the last finite step. Try a smaller lr, a smaller init_scale, or check the "
                    "model for values outside its support.",
                    result,
                )
            result.losses.append(loss_value)
            bar.update()
            if step % 50 == 0:
                recent = result.losses[-50:]
                bar.set_postfix(elbo=f"{-sum(recent) / len(recent):.4g}", lr=f"{learning_rate(step):.2g}")
            fresh = step + 1 - last_plateau >= 2 * window  # two windows since the rate last changed
            if num_steps is None and fresh and (step + 1) % window == 0 and has_converged(result.losses, window):
                plateaus, last_plateau = plateaus + 1, step + 1
                if plateaus == num_plateaus:
                    result.stop_reason = f"converged: {num_plateaus} plateaus of {window} steps"
                    break
        else:
            result.stop_reason = "reached num_steps" if num_steps is not None else f"reached max_steps={max_steps}"
    finally:
        bar.close()
        result.num_steps = len(result.losses)
        result.seconds = time.perf_counter() - start
    return result
