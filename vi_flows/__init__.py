"""vi-flows: normalizing-flow variational posteriors for Pyro models."""

from .arviz_export import to_inference_data
from .autoflow import AutoFlow
from .compare import CompareResult, compare
from .compiled_elbo import CompileError
from .draws import guide_moments, log_density_at, sample_constrained
from .fitting import FitResult, FittingError, fit
from .flows import (
    IAF,
    FlowTransform,
    Householder,
    HouseholderSylvester,
    OrthogonalSylvester,
    Planar,
    Radial,
    TriangularSylvester,
)
from .registry import (
    available_flows,
    build_flow,
    flow_aliases,
    get_flow,
    parse_spec,
    register_flow,
    transform_fn,
)

__version__ = "0.1.0"

__all__ = [
    "AutoFlow",
    "CompareResult",
    "CompileError",
    "FitResult",
    "FittingError",
    "FlowTransform",
    "Householder",
    "HouseholderSylvester",
    "IAF",
    "OrthogonalSylvester",
    "Planar",
    "Radial",
    "TriangularSylvester",
    "available_flows",
    "build_flow",
    "compare",
    "fit",
    "flow_aliases",
    "get_flow",
    "guide_moments",
    "log_density_at",
    "parse_spec",
    "register_flow",
    "sample_constrained",
    "to_inference_data",
    "transform_fn",
]
