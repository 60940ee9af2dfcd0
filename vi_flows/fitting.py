"""``fit``: run SVI with clipping, a decaying learning rate, a stopping rule and NaN protection."""

import math
import time
from dataclasses import dataclass, field

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from tqdm import tqdm

from .diagnostics import max_plate_nesting


class FittingError(RuntimeError):
    """The loss became NaN or infinite; the guide holds the last parameters with a finite loss.

    ``result`` is the :class:`FitResult` up to that step, so the loss trace is not lost.
    """

    def __init__(self, message, result):
        super().__init__(message)
        self.result = result


@dataclass
class FitResult:
    """What a call to :func:`fit` did: the loss per step, how long it ran and why it stopped."""

    losses: list = field(default_factory=list)
    num_steps: int = 0
    seconds: float = 0.0
    stop_reason: str = ""


def has_converged(losses, window):
    """True when the mean loss of the last ``window`` steps is no lower than that of the window
    before by more than two standard errors of the difference: the ELBO has stopped improving."""
    if len(losses) < 2 * window:
        return False
    previous = torch.tensor(losses[-2 * window : -window])
    last = torch.tensor(losses[-window:])
    standard_error = math.sqrt((previous.var() + last.var()).item() / window)
    return (previous.mean() - last.mean()).item() < 2 * standard_error


def fit(
    model,
    guide,
    *args,
    num_steps=None,
    lr=1e-2,
    num_particles=64,
    seed=None,
    progress=True,
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
    at the ``num_plateaus``-th plateau (or at ``max_steps``). Gradients are clipped to norm
    ``clip_norm`` (Pyro's ``ClippedAdam``).

    ``num_particles`` defaults to 64: on the zoo's small and medium models a vectorised step costs
    about the same with 64 particles as with 8 (Python overhead dominates), and the less noisy
    gradient lowers the KL reached by the default flow 3-9x on the banana, the funnel, the
    correlated Gaussian and the mixture. For models with large data sets, fewer particles are cheaper.
    ``window`` defaults to 1000 steps: with 500 the rule declared plateaus while the banana was
    still improving slowly (KL 0.10 at the stop against 0.010 with 1000), at twice the fitting time.

    If a loss is NaN or infinite, fitting stops, the parameters of the last finite step are
    restored and :class:`FittingError` names the step.
    """
    if seed is not None:
        pyro.set_rng_seed(seed)
    budget = num_steps if num_steps is not None else max_steps
    optimizer = pyro.optim.ClippedAdam({"lr": lr, "clip_norm": clip_norm})
    # Counting plates up front also sets the guide up, and keeps Pyro from logging its guess.
    nesting = max_plate_nesting(model, guide, *args, **kwargs)
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=nesting)
    svi = SVI(model, guide, optimizer, elbo)
    plateaus, last_plateau = 0, 0

    def learning_rate(step):
        warm = min(1.0, (step + 1) / warmup_steps)
        if num_steps is not None:
            return lr * warm * final_lr_fraction ** (max(step - warmup_steps, 0) / max(num_steps - warmup_steps, 1))
        return lr * warm * plateau_factor**plateaus

    result = FitResult()
    start = time.perf_counter()
    # Parameters before the previous step and before this one: a step whose loss is finite can
    # still leave NaN parameters behind (a NaN gradient), so a NaN loss at step t restores the
    # parameters step t - 1 started from, the last ones known to give a finite loss.
    before_previous, before_this = {}, {}
    store = pyro.get_param_store()
    bar = tqdm(total=budget, disable=not progress, desc="fit", unit="step", mininterval=1.0)
    try:
        for step in range(budget):
            before_previous, before_this = before_this, before_previous
            with torch.no_grad():
                for name, value in store.named_parameters():
                    before_this.setdefault(name, torch.empty_like(value)).copy_(value)
            for step_optimizer in optimizer.optim_objs.values():
                for group in step_optimizer.param_groups:
                    group["lr"] = learning_rate(step)
            try:
                loss = svi.step(*args, **kwargs)
            except ValueError as error:
                # With validation on (Pyro's default), NaNs surface as invalid distribution arguments.
                if "nan" not in str(error):
                    raise
                loss = float("nan")
            if not math.isfinite(loss):
                restore = before_previous if step > 0 else before_this
                with torch.no_grad():
                    for name, value in store.named_parameters():
                        if name in restore:
                            value.copy_(restore[name])
                result.stop_reason = f"loss was {loss} at step {step}"
                raise FittingError(
                    f"the loss became {loss} at step {step}; the guide's parameters are restored to "
                    "those of the last finite step. Try a smaller lr, a smaller init_scale, or check the "
                    "model for values outside its support.",
                    result,
                )
            result.losses.append(loss)
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
