"""Flow families; importing this package registers every built-in flow."""

# Import order is registration order, which is the order `vi-flows flows` lists them in.
from .base import FlowTransform  # isort: skip
from .planar import Planar  # isort: skip
from .radial import Radial  # isort: skip
from .householder import Householder  # isort: skip
from .sylvester import HouseholderSylvester, OrthogonalSylvester, TriangularSylvester  # isort: skip
from .iaf import IAF  # isort: skip

__all__ = [
    "FlowTransform",
    "Householder",
    "HouseholderSylvester",
    "IAF",
    "OrthogonalSylvester",
    "Planar",
    "Radial",
    "TriangularSylvester",
]
