r"""The base of ``AutoFlow``'s posterior: the map :math:`x = B\varepsilon` of standard normal noise that
the flow then transforms, one small module per choice of :math:`B`.

Each base gives the transform itself (``None`` for the identity) and, for the path-derivative
gradient, the flow's input at given noise with the score :math:`\nabla_x \log N(B^{-1}x)` there,
both with the base's parameters held fixed.
"""

import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import AffineTransform, LowerCholeskyAffine
from pyro.distributions.util import eye_like
from pyro.nn import PyroModule, PyroParam


class StandardBase(PyroModule):
    """:math:`B = I`."""

    def __init__(self, like):
        super().__init__()

    def transform(self):
        return None

    def input_and_score(self, noise):
        return noise, -noise


class DiagonalBase(PyroModule):
    """A learnable positive diagonal :math:`B`, from the identity."""

    def __init__(self, like):
        super().__init__()
        self.scale = PyroParam(torch.ones_like(like), constraints.softplus_positive)

    def transform(self):
        return AffineTransform(0.0, self.scale, event_dim=1, cache_size=1)

    def input_and_score(self, noise):
        scale = self.scale.detach()
        return scale * noise, -noise / scale


class FullRankBase(PyroModule):
    """A learnable lower-triangular :math:`B` with a positive diagonal, from the identity."""

    def __init__(self, like):
        super().__init__()
        self.scale_tril = PyroParam(eye_like(like, like.shape[-1]), constraints.lower_cholesky)

    def transform(self):
        return LowerCholeskyAffine(torch.zeros_like(self.scale_tril[..., 0]), self.scale_tril, cache_size=1)

    def input_and_score(self, noise):
        tril = self.scale_tril.detach()
        flow_input = (tril @ noise.unsqueeze(-1)).squeeze(-1)
        score = -torch.linalg.solve_triangular(tril.mT, noise.unsqueeze(-1), upper=True).squeeze(-1)
        return flow_input, score


BASES = {"standard": StandardBase, "diagonal": DiagonalBase, "fullrank": FullRankBase}
