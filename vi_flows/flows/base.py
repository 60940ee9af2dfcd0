"""Shared machinery of the flow families: the transform base class, a scalar root finder and the
score a flow pushes forward."""

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import nn
from torch.distributions import ComposeTransform, Transform, constraints

# Scale of the parameters that make a layer differ from the identity at initialisation: flows
# start close to their base, so a well-initialised base (e.g. a Laplace fit) is not spoiled.
NEAR_IDENTITY = 1e-2


class FlowTransform(TransformModule):
    """A bijection of R^D (``event_dim`` 1) whose forward pass also yields log|det J|.

    Subclasses implement :meth:`forward_and_log_det` and :meth:`_inverse`; a family whose Jacobian
    inverts in closed form also overrides :meth:`forward_and_score` (sticking the landing), which
    otherwise costs a dense Jacobian at every point. The log-determinant
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

    def forward_and_score(self, x, score):
        """``(y, score_y)`` as :func:`forward_and_score` defines them (it calls this without gradients
        and detaches the result); by default from the dense Jacobian."""
        return forward_and_score_by_jacobian(self, x, score)

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


def forward_and_score(transform, x, score):
    r"""``(y, score_y)``: any transform's output at the points ``x`` (shape ``(..., D)``) and the score
    :math:`\nabla_y \log q_Y(y)` of the density it pushes forward, given ``score`` :math:`=
    \nabla_x \log q_X(x)` of the density of ``x``: :math:`J^{-T}(\nabla_x \log q_X - \nabla_x
    \log|\det J|)`, detached from the transform's parameters. The path-derivative gradient
    (``AutoFlow``'s sticking-the-landing) carries the base's score through the flow with it."""
    with torch.no_grad():
        if isinstance(transform, FlowTransform):
            y, score = transform.forward_and_score(x, score)
        elif isinstance(transform, ComposeTransform):
            y = x
            for part in transform.parts:
                y, score = forward_and_score(part, y, score)
        else:
            y, score = forward_and_score_by_jacobian(transform, x, score)
    # Explicitly: a loss graph traced through this records no grad mode, and differentiated later
    # it would differentiate the whole computation (to a zero term, at a cost).
    return y.detach(), score.detach()


def forward_and_score_by_jacobian(transform, x, score):
    """:func:`forward_and_score` for any transform, from its dense Jacobian at every point (forward-mode
    differentiation, D directions per point) and a linear solve: families with a cheaper closed form
    override :meth:`FlowTransform.forward_and_score`."""
    flat = x.reshape(-1, x.shape[-1])

    def with_output(point):
        y, log_det = forward_and_log_det(transform, point)
        return (y, log_det), y

    (jacobian, log_det_gradient), y = torch.func.vmap(torch.func.jacfwd(with_output, has_aux=True))(flat)
    adjusted = score.reshape(flat.shape) - log_det_gradient
    # solve_ex: no error-checking op in a compiled graph, which would keep it out of PyTorch's cache.
    return y.reshape(x.shape), torch.linalg.solve_ex(jacobian.mT, adjusted)[0].reshape(x.shape)
