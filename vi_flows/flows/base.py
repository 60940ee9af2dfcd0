"""Shared machinery of the flow families: the transform base class, a scalar root finder and a
flow's Jacobian."""

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import nn
from torch.distributions import ComposeTransform, Transform, constraints

# Scale of the parameters that make a layer differ from the identity at initialisation: flows
# start close to their base, so a well-initialised base (e.g. a Laplace fit) is not spoiled.
NEAR_IDENTITY = 1e-2


class FlowTransform(TransformModule):
    """A bijection of R^D (``event_dim`` 1) whose forward pass also yields log|det J|.

    Subclasses implement :meth:`forward_and_log_det` and :meth:`_inverse`. The log-determinant
    of the last forward pass is kept with its output, so scoring a fresh sample costs nothing
    extra; for any other pair ``(x, y)`` it is recomputed from ``x``, so points the flow did not
    just sample (reference draws, data) are scored exactly rather than with a stale value.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    # torch's sign of the Jacobian determinant: every built-in family keeps it positive (constrained
    # planar and Sylvester layers, positive radial and IAF scales) except Householder's reflections.
    sign = +1

    def __init__(self, dim, num_layers=1, cache_size=1):
        if int(dim) < 1 or int(num_layers) < 1:
            raise ValueError(f"a flow needs dim >= 1 and num_layers >= 1, got dim={dim}, num_layers={num_layers}")
        super().__init__(cache_size=cache_size)
        self.dim = int(dim)
        self.num_layers = int(num_layers)
        self._last_output_and_log_det = None

    def forward_and_log_det(self, x):
        """Return ``(y, log|det dy/dx|)`` with shapes ``x.shape`` and ``x.shape[:-1]``."""
        raise NotImplementedError

    def _call(self, x):
        y, log_det = self.forward_and_log_det(x)
        self._last_output_and_log_det = (y, log_det)
        return y

    def log_abs_det_jacobian(self, x, y):
        last = self._last_output_and_log_det
        if last is not None and last[0] is y:
            return last[1]
        return self.forward_and_log_det(x)[1]

    def __getstate__(self):
        state = without_cache(self)
        state["_last_output_and_log_det"] = None
        return state

    def with_cache(self, cache_size=1):
        """The same flow (sharing its parameters) with torch's cache of the last pair set to
        ``cache_size`` (0 or 1)."""
        if cache_size == self._cache_size:
            return self
        if cache_size not in (0, 1):
            raise ValueError(f"cache_size must be 0 or 1, got {cache_size!r}")
        copy = self.__class__.__new__(self.__class__)
        copy.__dict__.update(self.__getstate__())
        copy._cache_size = cache_size
        copy._cached_x_y = None, None
        return copy

    # torch's Transform.__repr__ would hide the module's sizes and sub-modules.
    __repr__ = nn.Module.__repr__

    def extra_repr(self):
        return f"dim={self.dim}, num_layers={self.num_layers}"


def without_cache(transform):
    """A transform module's state for copying or pickling, without the cached last pass, which
    carries an autograd graph that cannot be copied."""
    state = Transform.__getstate__(transform)
    if "_cached_x_y" in state:
        state["_cached_x_y"] = None, None
    return state


def solve_monotone(func, derivative, target, lower, upper, num_iters=60):
    """Solve ``func(t) = target`` elementwise for an increasing ``func`` with a root in ``[lower, upper]``.

    Newton steps that leave the current bracket are replaced by bisection, so the solver
    converges for every strictly increasing ``func``; ``num_iters`` is fixed so the loop stays
    traceable.
    """
    t = (lower + upper) / 2
    for _ in range(num_iters):
        residual = func(t) - target
        lower = torch.where(residual < 0, t, lower)
        upper = torch.where(residual > 0, t, upper)
        newton = t - residual / derivative(t)
        inside = (newton >= lower) & (newton <= upper)
        t = torch.where(inside, newton, (lower + upper) / 2)
    return t


def forward_and_log_det(transform, x):
    """``(y, log|det dy/dx|)`` of any transform, without touching the caches of :class:`FlowTransform`
    parts (whose forward pass is a pure function); other transforms run through their public call."""
    if isinstance(transform, FlowTransform):
        return transform.forward_and_log_det(x)
    if isinstance(transform, ComposeTransform):
        log_det = x.new_zeros(x.shape[:-1])  # (a Python 0.0 would turn float64 under torch.func's transforms)
        for part in transform.parts:
            x, part_log_det = forward_and_log_det(part, x)
            log_det = log_det + part_log_det
        return x, log_det
    y = transform(x)
    return y, transform.log_abs_det_jacobian(x, y)


def inverse(transform, y):
    """The inverse of any transform at ``y``, without touching the caches of :class:`FlowTransform` parts
    (as :func:`forward_and_log_det`)."""
    if isinstance(transform, FlowTransform):
        return transform._inverse(y)
    if isinstance(transform, ComposeTransform):
        for part in reversed(transform.parts):
            y = inverse(part, y)
        return y
    return transform.inv(y)


def flow_jacobian(flow, x):
    """Jacobian of a flow at the points ``x`` (shape ``(..., D)``) and the gradient of its log|det J| there.

    Returns ``(dy/dx, d log|det J|/dx)`` with shapes ``(..., D, D)`` and ``(..., D)``, by forward-mode
    differentiation (D directions per point), detached from the flow's parameters.
    """
    with torch.no_grad():
        flat = x.detach().reshape(-1, x.shape[-1])
        jacobian, log_det_gradient = torch.func.vmap(torch.func.jacfwd(lambda point: forward_and_log_det(flow, point)))(flat)
    return jacobian.reshape(x.shape + x.shape[-1:]), log_det_gradient.reshape(x.shape)
