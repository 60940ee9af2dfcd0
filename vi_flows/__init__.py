"""vi-flows: normalizing-flow variational posteriors for Pyro models.

Names are imported on first use (PEP 562), so that ``vi-flows --help`` starts without loading
torch and Pyro.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "to_inference_data": "arviz_export",
    "AutoFlow": "autoflow",
    "CompareResult": "compare",
    "compare": "compare",
    "CompileError": "compiled_elbo",
    "guide_moments": "draws",
    "log_density_at": "draws",
    "sample_constrained": "draws",
    "item_scores": "item_likelihood",
    "FitResult": "fitting",
    "FittingError": "fitting",
    "fit": "fitting",
    **dict.fromkeys(
        ["IAF", "FlowTransform", "Householder", "HouseholderSylvester", "OrthogonalSylvester", "Planar", "Radial", "TriangularSylvester"],
        "flows",
    ),
    **dict.fromkeys(
        [
            "available_flows",
            "build_flow",
            "flow_aliases",
            "get_flow",
            "parse_spec",
            "register_flow",
            "registered_flow",
            "transform_fn",
            "unregister_flow",
        ],
        "registry",
    ),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vi_flows' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
