"""Finding models: the bundled zoo (``vi_flows.models``) or ``path/to/file.py:function``."""

import importlib
import importlib.util
import pkgutil
from pathlib import Path
from types import SimpleNamespace

from . import models


def list_models():
    """``{name: one-line description}`` of every bundled model."""
    names = sorted(info.name for info in pkgutil.iter_modules(models.__path__) if not info.name.startswith("_"))
    return {name: importlib.import_module(f"{models.__name__}.{name}").DESCRIPTION for name in names}


def load_model(spec):
    """Return a namespace with ``model`` and, where known, ``LOG_Z`` and ``sample_posterior``.

    ``spec`` is a zoo name (``vi-flows models`` lists them) or ``path/to/file.py:function``.
    """
    if ":" in spec:
        path, _, function = spec.rpartition(":")
        if not Path(path).is_file():
            raise ValueError(f"no model file at {path!r} (expected path/to/file.py:function)")
        module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        if not callable(getattr(module, function, None)):
            raise ValueError(f"{path!r} defines no function {function!r}")
        return SimpleNamespace(
            model=getattr(module, function),
            LOG_Z=getattr(module, "LOG_Z", None),
            sample_posterior=getattr(module, "sample_posterior", None),
            DESCRIPTION=f"{function} from {path}",
        )
    available = list_models()
    if spec not in available:
        raise ValueError(f"unknown model {spec!r}; bundled models: {', '.join(available)}, or pass path/to/file.py:function")
    return importlib.import_module(f"{models.__name__}.{spec}")
