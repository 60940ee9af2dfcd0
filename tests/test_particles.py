"""Models as users write them, whether or not they broadcast over a leading particle dimension."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from vi_flows import AutoFlow, fit
from vi_flows.diagnostics import log_importance_weights
from vi_flows.particles import Particles, choose, log_densities
from vi_flows.pyro_internals import max_plate_nesting

pytestmark = pytest.mark.usefixtures("fresh_param_store")

_generator = torch.Generator().manual_seed(1)
X = torch.randn(300, 3, generator=_generator)
Y = torch.bernoulli(torch.sigmoid(X @ torch.tensor([1.0, -2.0, 0.5]) + 0.3), generator=_generator)


def matmul_regression():
    """``X @ w`` cannot broadcast over a leading particle dimension of ``w``."""
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 2.0).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 2.0))
    with pyro.plate("data", 300):
        pyro.sample("y", dist.Bernoulli(logits=X @ w + b), obs=Y)


def broadcasting_regression():
    """The same model, written to broadcast."""
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 2.0).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 2.0))
    with pyro.plate("data", 300):
        pyro.sample("y", dist.Bernoulli(logits=(X * w).sum(-1) + b), obs=Y)


def value_reading_model():
    x = pyro.sample("x", dist.Normal(0.0, 1.0))
    if x.item() > 0:  # Python reads the value: one draw at a time only
        pyro.factor("right", -x)


def _particles(model, guide, num=16):
    return choose(model, guide, num, max_plate_nesting(model, guide))


def test_a_model_that_cannot_broadcast_is_mapped_over_the_draws_with_the_same_densities():
    guides = {name: AutoFlow(model, flow="planar*2", name=name) for name, model in [("mm", matmul_regression), ("bc", broadcasting_regression)]}
    modes = {name: _particles(model, guides[name]) for name, model in [("mm", matmul_regression), ("bc", broadcasting_regression)]}
    assert modes["mm"].mode == "vmap" and "Expected size" in modes["mm"].reason and modes["bc"].mode == "broadcast"
    guides["bc"].load_state_dict(guides["mm"].state_dict())
    # The same draws scored by both ways of running a model: the same log densities.
    results = []
    for name, model in [("mm", matmul_regression), ("bc", broadcasting_regression)]:
        for mode in ("broadcast", "vmap") if name == "bc" else ("vmap",):
            pyro.set_rng_seed(0)
            results.append(log_densities(model, guides[name], Particles(16, 1, mode, modes["mm"].site_shapes)))
    for log_q, log_p in results[1:]:
        torch.testing.assert_close(log_q, results[0][0])
        torch.testing.assert_close(log_p, results[0][1])


def test_fit_and_scoring_work_on_a_model_that_cannot_broadcast():
    guide = AutoFlow(matmul_regression, flow="planar*2")
    with pytest.warns(UserWarning, match="does not broadcast over a leading particle dimension .*torch.func.vmap"):
        result = fit(matmul_regression, guide, num_steps=300, progress=False, seed=0, compile=False)
    assert result.num_steps == 300 and result.losses[-1] < result.losses[0]
    assert log_importance_weights(matmul_regression, guide, num_samples=100).isfinite().all()


def test_a_model_that_reads_a_latent_value_runs_one_draw_at_a_time_and_is_not_compiled(monkeypatch):
    monkeypatch.setattr("vi_flows.fitting.COMPILE_MIN_STEPS", 1)
    guide = AutoFlow(value_reading_model, flow="planar")
    with pytest.warns(UserWarning, match="one draw at a time only .*8 particles one after another"):
        result = fit(value_reading_model, guide, num_steps=5, num_particles=8, progress=False)
    assert not result.compiled and result.compile_failure.startswith("could not trace the ELBO")
    assert result.num_steps == 5 and all(torch.isfinite(torch.tensor(result.losses)))


@pytest.mark.slow
def test_compare_on_a_users_matmul_regression_agrees_with_nuts(tmp_path, monkeypatch):
    """The issue's acceptance: ``vi-flows compare file.py:model`` runs every guide on a 300-point logistic
    regression written with ``X @ w + b``, and their means agree with NUTS within 0.1 sd; every guide's
    posterior is exported to ArviZ."""
    import pandas

    from vi_flows.cli import main

    monkeypatch.setenv("VI_FLOWS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "regression.py"
    path.write_text(
        "import pyro, pyro.distributions as dist, torch\n"
        "g = torch.Generator().manual_seed(1)\n"
        "X = torch.randn(300, 3, generator=g)\n"
        "y = torch.bernoulli(torch.sigmoid(X @ torch.tensor([1.0, -2.0, 0.5]) + 0.3), generator=g)\n"
        "def model():\n"
        "    w = pyro.sample('w', dist.Normal(torch.zeros(3), 2.0).to_event(1))\n"
        "    b = pyro.sample('b', dist.Normal(0.0, 2.0))\n"
        "    with pyro.plate('data', 300):\n"
        "        pyro.sample('y', dist.Bernoulli(logits=X @ w + b), obs=y)\n"
    )
    assert main(["compare", f"{path}:model", "--steps", "3000", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    exported = {file.name for file in (tmp_path / "out").glob("*.nc")}  # ArviZ's, the model run per draw
    assert exported == {"meanfield.nc", "fullrank.nc", "planar_8_iaf_4.nc", "reference.nc"}
    table = pandas.read_csv(tmp_path / "out" / "table.csv", index_col="guide")
    assert len(table) == 3 and (table["worst_mean_error"] < 0.1).all(), table
    flows_and_full_rank = table.drop(index="meanfield")
    assert ((flows_and_full_rank[["sd_ratio_min", "sd_ratio_max"]] - 1).abs() < 0.1).all().all(), table
