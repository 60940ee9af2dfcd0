"""``AutoFlow`` and its parts, one idea a module, as Pyro splits ``autoguide/``:

- ``guide``: ``AutoFlow`` itself, which only composes the parts below;
- ``base``: the base map of the noise (standard, diagonal, full-rank);
- ``initialization``: where the guide starts (prior point, Laplace approximation, the better one);
- ``noncentring``: the partial non-centring of hierarchical latents, linearised from the prior;
- ``posterior``: the posterior distribution and its path-derivative gradient;
- ``sites``: which latent sites one global guide can represent, and which are local;
- ``local``: the local sites' per-item posteriors, following the globals through the prior;
- ``pseudo_observations``: their parameters, a table per item or a network of each item's data;
- ``local_initialization``: where they start (each item's likelihood, Laplace-approximated).
"""

from .guide import DEFAULT_FLOW, AutoFlow

__all__ = ["AutoFlow", "DEFAULT_FLOW"]
