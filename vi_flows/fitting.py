"""``fit``: run SVI with clipping, a decaying learning rate, a stopping rule and NaN protection."""

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import pyro
import torch
from tqdm import tqdm

from .pyro_internals import max_plate_nesting
from .averaging import IterateAverage
from .data_parallel import process_group, rank, requested as data_parallel_requested
from .elbo_step import ELBOStep
from .guard import DivergenceGuard
from .schedule import LearningRate, PlateauRule
from .subsample_checks import check_item_shift, check_subsample_noise
from .threads import intra_op_threads

# compile="auto" compiles runs of at least this many steps. Measured on 2 CPU cores: a compiled step
# saves 2-18 ms against an eager one (python benchmarks/bench.py speed; 9.7 vs 0.8 ms for the default
# flow on the 10-D funnel); compiling the default flow's step takes about 3 s from PyTorch's cache and
# 30 s with an empty one (RESULTS.md, "Time to a good posterior"), so such a run repays it when the
# cache is warm.
COMPILE_MIN_STEPS = 2000


class FittingError(RuntimeError):
    """The loss became NaN or infinite and rolling back did not cure it; the guide holds the best
    parameters seen, or, before there were any, the last ones with a finite loss.

    ``result`` is the :class:`FitResult` up to that step, so the loss trace is not lost.
    """

    def __init__(self, message, result):
        super().__init__(message)
        self.result = result


@dataclass
class FitResult:
    """What a call to :func:`fit` did: the loss per step, how long it ran (``seconds``, compiling
    included), why it stopped, whether its steps ran compiled (from step ``compiled_from_step`` on),
    how long the steps stood waiting for the compiler (``compile_seconds``, tracing included) and,
    where compiling was tried and failed, why, each rollback after the loss diverged (what was seen, what was
    restored), how many intra-op threads the steps ran on, over how many steps the result is
    averaged, and on a subsampled plate the largest noise of a step's slope in the globals and the
    largest shift of a global were every item's rows refitted, both in posterior sds.
    ``(seconds - compile_seconds) / num_steps`` is the mean time per step."""

    losses: list = field(default_factory=list)
    num_steps: int = 0
    seconds: float = 0.0
    stop_reason: str = ""
    compiled: bool = False
    compile_seconds: float = 0.0
    compile_failure: str = ""
    compiled_from_step: int | None = None
    rollbacks: list = field(default_factory=list)
    num_threads: int = 0
    averaged_steps: int = 0
    subsample_noise: float = 0.0
    item_shift: float = 0.0


def fit(
    model: Callable,
    guide: Callable,
    *args,
    num_steps: int | None = None,
    lr: float = 1e-2,
    num_particles: int = 64,
    seed: int | None = None,
    progress: bool = True,
    compile: bool | str = "auto",
    max_steps: int = 20000,
    window: int = 1000,
    warmup_steps: int = 100,
    plateau_factor: float = 0.2,
    num_plateaus: int = 3,
    final_lr_fraction: float = 0.1,
    clip_norm: float = 10.0,
    rollback_block: int = 100,
    max_rollbacks: int = 3,
    sticking_the_landing: bool | str = "auto",
    threads: int | str = "auto",
    data_parallel: bool | str = "auto",
    control_variate: bool | str = "auto",
    refit_items: bool = True,
    **kwargs,
) -> FitResult:
    """Fit ``guide`` to ``model(*args, **kwargs)`` by SVI with vectorised ``Trace_ELBO`` particles.

    The learning rate warms up linearly over ``warmup_steps``. With ``num_steps`` fitting runs
    exactly that many steps, the rate then decaying geometrically to ``final_lr_fraction * lr``.
    Without, it decays on plateaus: whenever :func:`has_converged` says a ``window`` of steps did
    not improve on the one before, the rate is multiplied by ``plateau_factor``, and fitting stops
    at the ``num_plateaus``-th plateau (or at ``max_steps``). The optimiser is Adam with every
    gradient element clipped to ``[-clip_norm, clip_norm]`` (what Pyro's ``ClippedAdam`` does); on a
    subsampled plate the bound grows with the gradient's noise (:mod:`~vi_flows.clipping`), and
    Adam steps a guide's per-item tables lazily (:mod:`~vi_flows.item_steps`).

    ``num_particles`` defaults to 64: on the zoo's small and medium models a vectorised step costs
    about the same with 64 particles as with 8 (Python overhead dominates), and the less noisy
    gradient lowers the KL reached by the default flow 3-9x on the banana, the funnel, the
    correlated Gaussian and the mixture. For models with large data sets, fewer particles are cheaper.
    ``window`` defaults to 1000 steps: with 500 the rule declared plateaus while the banana was
    still improving slowly (KL 0.10 at the stop against 0.010 with 1000), at twice the fitting time.

    ``compile``: with ``True`` the loss is traced into one graph and compiled by TorchInductor with
    its gradient and update (see :mod:`~vi_flows.compiled_step`) before the first step: a step then
    costs 0.1-0.5x an eager one, after seconds of compiling (the default flow on the 10-D funnel:
    about 3 s with PyTorch's caches warm, 30 s with them empty). This
    needs a guide whose sites are all reparameterised (every autoguide of continuous latents) and
    a model whose control flow does not branch on latent values. ``"auto"`` compiles runs of
    ``COMPILE_MIN_STEPS`` steps or more and steps eagerly, through Pyro's ``Trace_ELBO``, where
    compiling fails (the result's ``compile_failure`` says why). ``"background"`` is ``"auto"``
    where, if PyTorch's cache lacks the step, a worker process compiles it while the first
    ``EAGER_STEPS_WHILE_COMPILING`` (250) steps run eagerly (:mod:`~vi_flows.compile_worker`): a
    posterior that is nearly there after a few hundred steps does not wait for the
    compiler, a whole fit takes 0-10 s longer (2 cores), and a first run draws other numbers than later ones.
    ``True`` compiles before the first step, or raises :class:`~vi_flows.CompileError`; ``False``
    never compiles.

    ``threads``: the intra-op threads the steps run on. ``"auto"`` times a few evaluations of the loss
    on one thread and on all (``torch.get_num_threads()``) and keeps one unless all are 1.2x faster:
    a small model's step gains little from a second thread and loses 5-30x when another process
    holds a core. The caller's setting is restored afterwards; an integer fixes it.

    ``sticking_the_landing`` (``True``, ``False`` or ``"auto"``) scores the draws of guides that offer
    it (``AutoFlow``) with the path-derivative gradient, whose variance vanishes as the guide
    approaches the posterior (see :func:`~vi_flows.compiled_elbo.negative_elbo`); ``"auto"`` up to
    ``STICKING_THE_LANDING_MAX_DIM`` = 20 latent dimensions, where its cost per step (the flow's
    inverse Jacobian applied at every draw) stays within 2.6x the plain step's for the default flow.

    A Monte Carlo gradient stays noisy at the optimum (more so on a subsampled plate): a fit by
    plateaus therefore ends at the mean of the iterates taken at its last learning rate
    (:mod:`~vi_flows.averaging`; the result's ``averaged_steps`` says over how many), not at the last one.
    On a subsampled plate, a guide that measures it (``AutoFlow`` with local posteriors) gives the
    noise of a step's slope in its globals, in posterior sds (the result's ``subsample_noise``,
    :mod:`~vi_flows.autoflow.subsample_noise`), and a warning where it exceeds ``MAX_SUBSAMPLE_NOISE``.
    ``control_variate`` (``True``, ``False`` or ``"auto"``: where the guide offers one) cancels most of
    that noise (:mod:`~vi_flows.control_variates`), re-anchored at every plateau (every ``window``
    steps with ``num_steps``). There too, with ``refit_items``, every item's rows are refitted to their
    optimum given the globals where the guide can (:mod:`~vi_flows.autoflow.item_refit`: per-item
    Gaussian local posteriors): the steps visit an item N / B times fewer than the globals. At the end,
    the result's ``item_shift`` says how far a refit would move the globals, with a warning above
    ``MAX_ITEM_SHIFT`` (:mod:`~vi_flows.subsample_checks`).

    Fitting keeps the parameters (and optimiser state) of the best ``rollback_block`` steps so far,
    by median loss (:class:`~vi_flows.guard.DivergenceGuard`). If the loss diverges, a block's median
    rising more than about a nat above that best or a loss turning NaN or infinite, they are put
    back and the learning rate is cut as at a plateau; each rollback is recorded in the result's
    ``rollbacks``. After ``max_rollbacks`` rollbacks a rise stops the fit at the best parameters
    with a warning, and a non-finite loss raises :class:`FittingError` naming the step. Before the
    first block the start is the best there is.

    ``data_parallel`` (``True``, ``False`` or ``"auto"``: where ``torchrun`` started this process as
    one of several, or a process group of several ranks exists) fits as one rank of several
    (:mod:`~vi_flows.data_parallel`): each draws its subsamples from its own shard of the items, the
    ranks average their gradients and losses, and every rank ends with the whole fitted guide. With
    ``"own-data"`` each rank's model holds only its own items of every subsampled plate (its shard
    of a dataset, loaded by the rank): the ranks share the globals and each keeps its items' posteriors.
    Without a process group, ``fit`` starts one from ``torchrun``'s environment and ends it after.
    Only rank 0 shows progress.
    """
    if compile not in (True, False, "auto", "background"):
        raise ValueError(f"compile must be True, False, 'auto' or 'background', got {compile!r}")
    parallel = data_parallel_requested(data_parallel)
    if seed is not None:
        pyro.set_rng_seed(seed)
    budget = num_steps if num_steps is not None else max_steps
    if compile in ("auto", "background") and budget < COMPILE_MIN_STEPS:
        compile = False  # too few steps to repay the seconds of compiling
    result = FitResult()
    start = time.perf_counter()
    bar = tqdm(total=budget, disable=not progress or rank() != 0, desc="fit", unit="step", mininterval=1.0)
    ranks = contextlib.ExitStack()  # the process group, data-parallel
    step_once = None
    try:
        if compile:
            bar.set_description("fit: compiling the ELBO (seconds to minutes)", refresh=True)
        # Counting plates up front also sets the guide up, and keeps Pyro from logging its guess.
        nesting = max_plate_nesting(model, guide, *args, **kwargs)
        if parallel:
            ranks.enter_context(process_group(_device(guide)))
        options = dict(compile=compile, clip_norm=clip_norm, sticking_the_landing=sticking_the_landing, threads=threads, control_variate=control_variate, refit_items=refit_items)
        step_once = ELBOStep(model, guide, *args, num_particles=num_particles, max_plate_nesting=nesting, data_parallel=parallel, **options, **kwargs)
        if parallel and seed is not None:
            pyro.set_rng_seed(seed + rank())  # the ranks' own draws, from rank 0's start
        bar.set_description("fit")
        result.num_threads = step_once.num_threads
        learning_rate = LearningRate(lr, warmup_steps, num_steps, final_lr_fraction, plateau_factor)
        plateaus = PlateauRule(window) if num_steps is None else None
        guard = DivergenceGuard(step_once.params, step_once.optimizer, block=rollback_block)
        # The last rate's iterates are averaged (vi_flows.averaging).
        average = IterateAverage(step_once.params) if plateaus is not None else None
        with intra_op_threads(step_once.num_threads):
            result.stop_reason = _run(step_once, budget, learning_rate, plateaus, num_plateaus, guard, max_rollbacks, result, bar, average, window)
        if average is not None and result.stop_reason.startswith("converged"):
            average.apply()
            result.averaged_steps = average.count
        if parallel:
            step_once.parallel.gather_tables(step_once.optimizer)
        if step_once.subsampled:
            ranks_noise, ranks_shift = (step_once.parallel.combine_noise, step_once.parallel.combine_shift) if parallel else (None, None)
            result.subsample_noise = check_subsample_noise(guide, step_once.control_variate, *args, combine=ranks_noise, **kwargs)
            result.item_shift = check_item_shift(guide, *args, shard=step_once.shard, combine=ranks_shift, **kwargs)
        if not result.stop_reason:
            result.stop_reason = "reached num_steps" if num_steps is not None else f"reached max_steps={max_steps}"
    finally:
        if step_once is not None:
            step_once.close()
            _record_compiling(result, step_once)
        ranks.close()
        bar.close()
        result.num_steps = len(result.losses)
        result.seconds = time.perf_counter() - start
    return result


def _record_compiling(result, step_once):
    result.compiled, result.compiled_from_step = step_once.compiled, step_once.compiled_from_step
    result.compile_seconds, result.compile_failure = step_once.compile_seconds, step_once.compile_failure


def _device(guide):
    """Where a guide's parameters live (the CPU for a guide with none, or a function)."""
    tensors = [*guide.parameters(), *guide.buffers()] if isinstance(guide, torch.nn.Module) else []
    return tensors[0].device if tensors else torch.device("cpu")


def _run(step_once, budget, learning_rate, plateaus, num_plateaus, guard, max_rollbacks, result, bar, average=None, window=None):
    """Take up to ``budget`` steps, recording losses in ``result``; return why fitting stopped early,
    or "" if it did not. ``plateaus`` is None for a fixed number of steps (the control variate is
    then re-anchored every ``window`` steps); ``average``, where given, averages the iterates after
    the last plateau but one."""
    for step in range(budget):
        if plateaus is None and step and window and step % window == 0:
            step_once.refresh()
        # Validation off, as in the compiled graph: NaN parameters then give a NaN loss, not an error.
        with pyro.validation_enabled(False):
            loss_value = step_once(learning_rate(step))
        if math.isfinite(loss_value):
            result.losses.append(loss_value)
            _show_progress(bar, result.losses, learning_rate(step))
        divergence = guard.check(result.losses, loss_value)
        if divergence is not None:
            if _roll_back(guard, divergence, math.isfinite(loss_value), result, max_rollbacks):
                return result.stop_reason
            learning_rate.cut()
            if plateaus is not None:
                plateaus.restart(len(result.losses))
        elif plateaus is not None and plateaus(result.losses):
            learning_rate.cut()
            if plateaus.count == num_plateaus:
                return f"converged: {num_plateaus} plateaus of {plateaus.window} steps"
            step_once.refresh()
        if average is not None and plateaus.count == num_plateaus - 1 and divergence is None:
            average.update()
    return ""


def _show_progress(bar, losses, lr):
    bar.update()
    if len(losses) % 50 == 1:
        recent = losses[-50:]
        bar.set_postfix(elbo=f"{-sum(recent) / len(recent):.4g}", lr=f"{lr:.2g}")


def _roll_back(guard, divergence, finite, result, max_rollbacks):
    """Restore the best parameters after a divergence and record it; True when fitting must stop.
    Raises :class:`FittingError` for a non-finite loss that rolling back cannot (or did not) cure."""
    exhausted = len(result.rollbacks) == max_rollbacks
    guard.restore()
    if not finite and exhausted:
        result.stop_reason = divergence
        raise FittingError(
            f"{divergence}; the guide's parameters are restored to those of {guard.best()}. Try a smaller lr, a smaller "
            "init_scale, or check the model for values outside its support.",
            result,
        )
    if exhausted:
        result.stop_reason = f"diverged: {divergence} after {max_rollbacks} rollbacks; stopped at the best parameters, of {guard.best()}"
        warnings.warn(f"fit {result.stop_reason}. Try a smaller lr or a simpler flow.")
        return True
    result.rollbacks.append(f"{divergence}: restored the parameters of {guard.best()} and cut the learning rate")
    return False
