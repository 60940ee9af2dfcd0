"""``AutoFlow`` and its parts, one idea a module, as Pyro splits ``autoguide/``:

- ``guide``: ``AutoFlow`` itself, which only composes the parts below;
- ``base``: the base map of the noise (standard, diagonal, full-rank);
- ``initialization``: where the guide starts (prior point, Laplace approximation, the better one);
- ``noncentring``: the partial non-centring of hierarchical latents, linearised from the prior;
- ``posterior``: the posterior distribution and its path-derivative gradient;
- ``sites``: which latent sites one global guide can represent.
"""

from .guide import DEFAULT_FLOW, AutoFlow

__all__ = ["AutoFlow", "DEFAULT_FLOW"]
