"""Flow families, one a module; the built-in ones are registered here, from one list, in the order
`vi-flows flows` lists them."""

from ..registry import register_flow
from .affine import Affine
from .base import FlowTransform
from .householder import Householder
from .iaf import IAF
from .planar import Planar
from .radial import Radial
from .sylvester import HouseholderSylvester, OrthogonalSylvester, TriangularSylvester

BUILTIN_FLOWS = (
    ("affine", Affine, "mu + exp(s) * z: a shift and scale per coordinate; per item, a Gaussian posterior (Kingma & Welling 2014)", ()),
    ("planar", Planar, "z + u tanh(w.z + b): bends space along a hyperplane (Rezende & Mohamed 2015)", ()),
    ("radial", Radial, "z + beta (z - z0) / (alpha + |z - z0|): contracts or expands around a point (Rezende & Mohamed 2015)", ()),
    ("householder", Householder, "volume-preserving product of reflections; rotates a learnable base (Tomczak & Welling 2016)", ()),
    (
        "sylvester-orthogonal",
        OrthogonalSylvester,
        "z + QR h(R~Q^T z + b) with Q: D x M orthonormal columns, M <= D (van den Berg et al. 2018)",
        (),
    ),
    (
        "sylvester-householder",
        HouseholderSylvester,
        "Sylvester flow with Q a product of Householder reflections (van den Berg et al. 2018)",
        ("sylvester",),
    ),
    (
        "sylvester-triangular",
        TriangularSylvester,
        "Sylvester flow with Q alternating identity / reversal permutation (van den Berg et al. 2018)",
        (),
    ),
    ("iaf", IAF, "affine inverse autoregressive flow with a MADE network (Kingma et al. 2016)", ()),
)
for _name, _family, _description, _aliases in BUILTIN_FLOWS:
    register_flow(_name, stackable=True, description=_description, aliases=_aliases)(_family)

__all__ = [
    "Affine",
    "BUILTIN_FLOWS",
    "FlowTransform",
    "Householder",
    "HouseholderSylvester",
    "IAF",
    "OrthogonalSylvester",
    "Planar",
    "Radial",
    "TriangularSylvester",
]
