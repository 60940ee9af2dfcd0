"""One optimisation step of ``fit``: the vectorised negative ELBO, compiled where it can be, its
gradient clipped, and an Adam update."""

import contextlib
import functools
import time
import warnings

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from .clipping import clip_gradient
from .compiled_elbo import CompileError, first_score_function_site, is_subsampled, negative_elbo, trace_negative_elbo
from .compiled_step import CompiledAdamStep
from .data_parallel import OWN_DATA, DataParallel
from .inductor import start_probing_cpu
from .item_steps import lazy_adam_step
from .messages import first_line
from .particles import choose
from .pyro_internals import trained_parameters
from .step_warnings import warn_about_nested_locals, warn_about_untrained, warn_unless_broadcast
from .subsampling import FastSubsamples
from .threads import fastest_threads

# With compile="background" and nothing in Inductor's cache for the step, a worker process compiles
# it (:mod:`~vi_flows.compile_worker`) while this many steps run eagerly, and the next waits for it:
# a fixed step, whatever the clock says, so that such a fit takes the same steps on every cold
# start. The default flow reaches KL 0.008 on the 10-D funnel by then (RESULTS.md, "Time to a good
# posterior"), in 2-3 s of eager steps instead of the 30 s a cold compile takes.
EAGER_STEPS_WHILE_COMPILING = 250


class ELBOStep:
    """One optimisation step of ``fit``: the vectorised negative ELBO of ``model`` and ``guide``
    (:func:`~vi_flows.compiled_elbo.negative_elbo`, with the path-derivative gradient as
    ``sticking_the_landing`` says; Pyro's ``Trace_ELBO`` for guides with sites that are not
    reparameterised), its gradient clipped elementwise to ``[-clip_norm, clip_norm]`` (as Pyro's
    ``ClippedAdam`` does; on a subsampled plate, not below the noise: :mod:`~vi_flows.clipping`) and
    an Adam update of every parameter that model and guide read, lazy on the guide's per-item
    tables (``guide.item_tables()``, :mod:`~vi_flows.item_steps`). A large plate's subsample is
    drawn in O(B) (:mod:`~vi_flows.subsampling`), and with ``control_variate`` (``True``, ``False`` or
    ``"auto"``: where the guide offers one) the subsample's noise in the globals' gradient is mostly
    cancelled (:mod:`~vi_flows.control_variates`). With ``refit_items``, :meth:`refresh` refits every
    item's rows of a subsampled plate where the guide can (``guide.refit_items``,
    :mod:`~vi_flows.autoflow.item_refit`): its steps visit an item N / B times fewer than the globals.

    ``threads`` is how many intra-op threads its steps should run on (``num_threads``; "auto" times
    them, None keeps the caller's); with ``compile=True`` the whole step (loss, gradient, clip and
    update) runs as one compiled graph (:class:`~vi_flows.compiled_step.CompiledAdamStep`), raising
    :class:`~vi_flows.CompileError` where it cannot; with ``"auto"`` it falls back to eager steps,
    keeping the reason in ``compile_failure``; ``"background"`` does too, and where Inductor's cache
    lacks the step the first ``EAGER_STEPS_WHILE_COMPILING`` steps run eagerly while a worker process compiles it
    (``compiled_from_step`` says where the compiled steps began; :meth:`close` stops the worker).
    With ``data_parallel`` it is one rank's step of a data-parallel fit in the default process group
    (:mod:`~vi_flows.data_parallel`, ``parallel``).
    """

    def __init__(
        self,
        model,
        guide,
        *args,
        num_particles,
        max_plate_nesting,
        compile=False,
        clip_norm=10.0,
        sticking_the_landing="auto",
        threads=None,
        data_parallel=False,
        control_variate="auto",
        refit_items=True,
        **kwargs,
    ):
        if sticking_the_landing not in (True, False, "auto"):
            raise ValueError(f"sticking_the_landing must be True, False or 'auto', got {sticking_the_landing!r}")
        if control_variate not in (True, False, "auto"):
            raise ValueError(f"control_variate must be True, False or 'auto', got {control_variate!r}")
        user_guide = guide
        self.particles, self.control_variate = None, None
        self.subsampled = is_subsampled(guide, *args, **kwargs)
        if first_score_function_site(guide, *args, **kwargs) is None:
            self.particles = choose(model, guide, num_particles, max_plate_nesting, *args, **kwargs)
            warn_unless_broadcast(self.particles)
        else:  # score-function terms: Pyro's own estimator
            self._elbo = Trace_ELBO(num_particles=num_particles, max_plate_nesting=max_plate_nesting, vectorize_particles=True)
        self.loss = self._loss(model, guide, args, kwargs, sticking_the_landing)
        self.params = trained_parameters(self.loss)
        warn_about_untrained(guide, self.params)
        self.num_threads = self._threads(threads)
        self.tables = _item_tables(guide, self.params)
        self.parallel = None
        if data_parallel:
            model, guide = self._join_ranks(model, guide, data_parallel, args, kwargs)
        if self.subsampled:  # large plates draw their subsamples in O(B) (vi_flows.subsampling)
            guide = FastSubsamples()(guide)
        # Its terms pair each draw with the guide's subsample: vmap's model runs draw their own.
        possible = self.subsampled and self.particles is not None and self.particles.mode != "vmap"
        self.control_variate = _control_variate(user_guide, control_variate, possible, self.parallel, args, kwargs)
        if self.subsampled:
            warn_about_nested_locals(user_guide)
        refit = getattr(user_guide, "refit_items", None) if refit_items and self.subsampled else None
        self._refit_items = functools.partial(refit, *args, **kwargs) if refit is not None else None
        self.loss = self._loss(model, guide, args, kwargs, sticking_the_landing)
        self.optimizer = torch.optim.Adam(self.params, fused=True)  # one kernel for all parameters
        self.clip_norm = clip_norm
        self.compiled, self.compile_failure, self.compile_seconds, self.compiled_from_step = False, "", 0.0, None
        self._compiled_step, self._in_background, self._steps = None, None, 0
        if compile:
            self._start_compiling(model, guide, args, kwargs, sticking_the_landing, compile)

    def _join_ranks(self, model, guide, data_parallel, args, kwargs):
        """Set up this rank's part of a data-parallel fit, from rank 0's start; the model and guide
        as this rank runs them."""
        own_data = data_parallel == OWN_DATA
        if own_data and not _model_subsamples(model, guide, args, kwargs):
            raise ValueError(
                "data_parallel='own-data' weighs each rank's items of its subsampled plates as the share of the data they "
                "are, and this model subsamples no plate: give the plate of each rank's items a subsample_size"
            )
        self.parallel = DataParallel(self.params, self.tables, own_data=own_data)
        buffers = list(guide.buffers()) if isinstance(guide, torch.nn.Module) else []
        self.parallel.broadcast([*self.params, *buffers])
        # Sharing the data, the model replays the guide's subsamples; holding its own, its items weigh more too.
        return (self.parallel.wrap(model) if own_data else model), self.parallel.wrap(guide)

    def _start_compiling(self, model, guide, args, kwargs, sticking_the_landing, compile):
        """Trace the whole step and compile it: here, or with ``compile="background"`` where
        Inductor's cache lacks it, in a worker process while the first steps run eagerly."""
        start = time.perf_counter()
        if all(param.device.type == "cpu" for param in self.params):
            start_probing_cpu()  # meanwhile, tracing
        try:
            with torch.random.fork_rng():  # tracing runs the loss; the steps draw what eager steps would
                graph = trace_negative_elbo(
                    model, guide, self.params, self.particles, *args, sticking_the_landing=sticking_the_landing, control_variate=self.control_variate, item_tables=self.tables, gradients=True, **kwargs
                )
            reduce = self.parallel.average if self.parallel is not None else None
            compiled_step = CompiledAdamStep(
                graph, self.params, self.optimizer, self.clip_norm, self.tables, self.subsampled, reduce=reduce, num_threads=self.num_threads, in_background=compile == "background"
            )
            if compiled_step.in_background:
                self._in_background = compiled_step
            else:
                self._switch_to(compiled_step)
        except CompileError as failure:
            if compile is True:
                raise
            self.compile_failure = str(failure)
        self.compile_seconds += time.perf_counter() - start

    def _collect(self):
        """Wait for the step compiled in the background and switch to it; or, where compiling failed,
        keep stepping eagerly and say why in ``compile_failure``."""
        start = time.perf_counter()
        compiled_step, self._in_background = self._in_background, None
        try:
            compiled_step.finish()
            self._switch_to(compiled_step)
        except CompileError as failure:
            self.compile_failure = str(failure)
        self.compile_seconds += time.perf_counter() - start

    def _switch_to(self, compiled_step):
        compiled_step.warm_up()
        self._compiled_step, self.compiled, self.compiled_from_step = compiled_step, True, self._steps

    def close(self, wait=False):
        """Stop compiling in the background, if a worker still is (the fit ended first); with
        ``wait``, let it finish instead, so that PyTorch's cache holds the step for the next fit."""
        if self._in_background is None:
            return
        compiled_step, self._in_background = self._in_background, None
        if not wait:
            compiled_step.stop()
            return
        with contextlib.suppress(CompileError):  # the eager steps were all the fit needed
            compiled_step.finish()

    def _loss(self, model, guide, args, kwargs, sticking_the_landing):
        """The loss of one step, a function of nothing."""
        if self.particles is None:
            return functools.partial(self._elbo.differentiable_loss, model, guide, *args, **kwargs)
        return functools.partial(negative_elbo, model, guide, self.particles, *args, sticking_the_landing=sticking_the_landing, control_variate=self.control_variate, **kwargs)

    def _threads(self, threads):
        """The intra-op threads to step on: ``threads``, or with "auto" the faster of one and all
        (:func:`~vi_flows.threads.fastest_threads`, timing the eager loss and its gradient), or with
        None the caller's setting."""
        if threads is None:
            return torch.get_num_threads()
        if threads != "auto":
            return int(threads)

        def loss_and_gradient():
            self.loss().backward()

        with pyro.validation_enabled(False), torch.random.fork_rng():  # a seeded fit draws what it would have
            num_threads = fastest_threads(loss_and_gradient)
        for param in self.params:
            param.grad = None
        return num_threads

    def refresh(self):
        """Between runs of steps (O(N), split over the ranks of a data-parallel fit): refit the items'
        rows where the step does, forgetting their momentum, then re-anchor the control variate, where
        the step has one, at the guide's posterior mean."""
        if self._refit_items is not None and self._refit_items(shard=self.shard) is not None:
            for table in self.tables:
                state = self.optimizer.state.get(table)
                if state:  # the rows' old direction, which the refit has already taken
                    state["exp_avg"].zero_()
        if self.control_variate is not None:
            self.control_variate.refresh(self.shard)

    @property
    def shard(self):
        """This rank's share of the items (:class:`~vi_flows.data_parallel.Shard`), None in one process."""
        return self.parallel.shard if self.parallel is not None else None

    def __call__(self, lr):
        """Take one step at learning rate ``lr``; return the loss before it (data-parallel, the ranks' mean)."""
        if self._in_background is not None and self._steps >= EAGER_STEPS_WHILE_COMPILING:
            self._collect()
        self._steps += 1
        return self._compiled_step(lr) if self._compiled_step is not None else self._eager_step(lr)

    def _eager_step(self, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.loss()
        loss.backward()
        if self.parallel is not None:
            loss, gradients = self.parallel.average(loss.detach(), [param.grad for param in self.params])
            for param, gradient in zip(self.params, gradients):
                param.grad = gradient
        _clip_eagerly(self)
        lazy_adam_step(self.optimizer, self.tables)
        self.optimizer.zero_grad()
        return loss.item()


def _control_variate(guide, wanted, possible, parallel, args, kwargs):
    """The guide's control variate for the subsample's noise (:mod:`~vi_flows.control_variates`),
    anchored (each rank its share, ``parallel``), where ``wanted`` and ``possible`` (a subsampled step
    of reparameterised draws) and the guide offers one (``guide.control_variate``); else None, or
    with ``wanted=True`` an error."""
    offer = getattr(guide, "control_variate", None)
    control_variate = offer(*args, **kwargs) if wanted and possible and offer is not None else None
    if control_variate is None and wanted is True:
        raise ValueError(
            "control_variate=True needs a subsampled plate of local latents, reparameterised, and a guide that offers "
            "a control variate for it (AutoFlow with local posteriors); pass control_variate='auto' or False."
        )
    if control_variate is None:
        return None
    if parallel is not None and parallel.own_data:
        control_variate.weight = parallel.world_size  # as the rank's items weigh
    try:
        control_variate.refresh(parallel.shard if parallel is not None else None)
    except (RuntimeError, NotImplementedError) as failure:  # the items' slopes need second derivatives
        if wanted is True:
            raise
        warnings.warn(f"fit steps without the control variate for the subsample's noise: its items' slopes failed ({first_line(failure)})")
        return None
    return control_variate


def _clip_eagerly(step):
    """Clip the gradients in place as the compiled step does (:mod:`~vi_flows.clipping`)."""
    if not step.subsampled:  # the fixed bound, in one call
        torch.nn.utils.clip_grad_value_(step.params, step.clip_norm)
        return
    beta2 = step.optimizer.param_groups[0]["betas"][1]
    with torch.no_grad():
        for param in (param for param in step.params if param.grad is not None):
            state = step.optimizer.state.get(param)
            square = state["exp_avg_sq"] if state else torch.zeros_like(param)
            count = (state["step"] if state else torch.zeros(())).to(torch.float64) + 1
            param.grad.copy_(clip_gradient(param.grad, square, count, beta2, step.clip_norm, step.subsampled))


def _item_tables(guide, params):
    """The guide's per-item tables that are trained, which Adam steps lazily (:mod:`~vi_flows.item_steps`)."""
    trained = {id(param) for param in params}
    # An AutoGuideList holds its guides as submodules: their tables are stepped lazily too.
    parts = guide.modules() if isinstance(guide, torch.nn.Module) else [guide]
    tables = [table for part in parts if hasattr(part, "item_tables") for table in part.item_tables()]
    return [table for table in tables if id(table) in trained]


def _model_subsamples(model, guide, args, kwargs):
    """Whether ``model``, replaying a draw of ``guide`` (the caller's random state kept), reads a
    subsample of a plate."""
    with torch.random.fork_rng(), torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        return is_subsampled(poutine.replay(model, trace=guide_trace), *args, **kwargs)
