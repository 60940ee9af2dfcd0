"""Fixtures shared by test modules."""

import importlib

import pyro
import pytest

from vi_flows import AutoFlow, fit


@pytest.fixture
def fresh_param_store():
    """An empty Pyro param store and seed 0 for the test, the store emptied again after it."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def default_fit():
    """``default_fit(target)``: the default ``AutoFlow`` of a zoo model after the default ``fit``
    (seed 0) and its ``FitResult``, fitted once per session for every test that checks it."""
    fitted = {}

    def fitted_guide(target):
        if target not in fitted:
            module = importlib.import_module(f"vi_flows.models.{target}")
            pyro.clear_param_store()
            guide = AutoFlow(module.model)
            fitted[target] = guide, fit(module.model, guide, seed=0, progress=False)
        # A PyroModule reads its parameters from the param store when it holds their names: clear it,
        # so the guide runs on its own fitted values whatever other tests put there since.
        pyro.clear_param_store()
        return fitted[target]

    return fitted_guide
