"""compare(), the zoo loader and the ``vi-flows compare`` / ``vi-flows models`` commands."""

import numpy as np
import pandas
import pytest
import torch
from vi_flows.models import banana, eight_schools, gaussian_mixture

from vi_flows.cli import main
from vi_flows.compare import compare
from vi_flows.zoo import list_models, load_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")


def test_compare_scores_every_guide_against_the_reference():
    result = compare(
        banana.model,
        guides=("meanfield", "planar*2"),
        reference=banana.sample_posterior(2000),
        log_z=banana.LOG_Z,
        num_steps=30,
        num_draws=500,
        quiet=True,
    )
    table = result.table
    assert list(table.index) == ["meanfield", "planar*2"] and not result.errors
    assert (table["kl"] > -3 * table["elbo_se"]).all()
    assert (table["iw_elbo"] >= table["elbo"]).all()
    # Mass covering: the mean log q at reference draws is at most E_p[log p] (Gibbs' inequality, with noise).
    import pyro.distributions as dist

    x1, x2 = result.reference["x1"], result.reference["x2"]
    log_p = dist.Normal(0.0, 10.0).log_prob(x1) + dist.Normal(0.1 * (x1**2 - 100), 1.0).log_prob(x2)
    assert (table["mean_log_q_at_reference"] < log_p.mean().item() + 0.1).all()
    assert (table["sd_ratio_min"] <= table["sd_ratio_max"]).all() and (table["worst_mean_error"] > 0).all()
    assert set(result.fits) == set(result.guides) == {"meanfield", "planar*2"}
    parameters = result.parameters.set_index(["guide", "parameter"])
    assert len(parameters) == 4 and parameters.loc[("meanfield", "x2"), "sd_ratio"] > 0
    assert (parameters["wasserstein"] >= 0).all()


def test_guides_and_reference_export_together_to_arviz():
    import arviz as az
    import matplotlib.pyplot as plt

    generator = torch.Generator().manual_seed(0)
    reference = {
        "mu": torch.randn(400, generator=generator),
        "tau": torch.rand(400, generator=generator) + 1,
        "theta": torch.randn(400, 8, generator=generator),
    }
    result = compare(eight_schools.model, guides=("meanfield", "planar*2"), reference=reference, num_steps=20, num_draws=200, quiet=True)
    exported = result.inference_data(num_samples=300)
    assert list(exported) == ["meanfield", "planar*2", "reference"]
    for data in exported.values():
        assert data.posterior["theta"].dims == ("chain", "draw", "school")
    assert exported["reference"].posterior["theta"].shape == (1, 400, 8)
    np.testing.assert_allclose(exported["reference"].posterior["theta"].values[0], reference["theta"].numpy())
    summary = result.summary(num_samples=300)
    assert summary.index.names == ["guide", "parameter"] and len(summary) == 3 * 10
    np.testing.assert_allclose(summary.loc[("reference", "tau"), "mean"], reference["tau"].mean().item(), atol=1e-3)
    assert summary.loc[("meanfield", "tau"), "sd"] > 0
    az.plot_forest(list(exported.values()), model_names=list(exported), var_names=["tau"])
    plt.close("all")


def test_guides_can_be_labelled_names_or_functions_of_the_model():
    from vi_flows import AutoFlow

    guides = {"flow": "planar*2", "centred flow": lambda model: AutoFlow(model, flow="planar*2", non_centring=False)}
    result = compare(eight_schools.model, guides=guides, reference=None, num_steps=5, num_draws=100, quiet=True)
    assert list(result.table.index) == ["flow", "centred flow"] and not result.errors
    assert result.guides["flow"].non_centring and not result.guides["centred flow"].non_centring


def test_means_and_sds_are_scored_against_exact_moments_when_given():
    reference = banana.sample_posterior(500)
    common = dict(guides=("planar*2",), reference=reference, num_steps=5, num_draws=200, quiet=True)
    from_draws = compare(banana.model, **common).table.loc["planar*2"]
    exact = {name: (values.mean(0), 1e6 * values.std(0)) for name, values in reference.items()}
    from_moments = compare(banana.model, reference_moments=exact, moment_draws=3000, **common).table.loc["planar*2"]
    assert from_moments["sd_ratio_max"] < 1e-4 < from_draws["sd_ratio_min"]
    assert from_moments["mean_log_q_at_reference"] == from_draws["mean_log_q_at_reference"]  # still the draws


def test_a_failing_guide_is_recorded_and_the_others_still_run():
    result = compare(gaussian_mixture.model, guides=("meanfield", "planar*2"), reference=None, num_steps=5, num_draws=200, quiet=True)
    assert set(result.errors) == {"meanfield"}  # Pyro's autoguides cannot initialise ImproperUniform
    assert result.table.loc["meanfield"].isna().all() and result.table.loc["planar*2", "elbo"] < 0


def test_cli_compare_writes_the_table_and_plots(tmp_path, capsys):
    code = main(["compare", "banana", "--guides", "meanfield", "planar*2", "--steps", "20", "--out", str(tmp_path), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "meanfield" in out and "planar*2" in out and "khat" in out
    files = ("table.csv", "parameters.csv", "table.md", "elbo_traces.png", "khat.png", "marginals.png", "meanfield.nc", "planar_2.nc", "reference.nc")
    for name in files:
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "table.md").read_text().count("\n") == 4  # header, rule, two guides


def test_cli_compare_is_reproducible(tmp_path, capsys):
    tables = []
    for run in ("first", "second"):
        assert main(["compare", "banana", "--guides", "planar", "--steps", "5", "--out", str(tmp_path / run), "--quiet"]) == 0
        tables.append(pandas.read_csv(tmp_path / run / "table.csv").drop(columns=["fit_seconds", "ms_per_step"]))
    pandas.testing.assert_frame_equal(tables[0], tables[1])  # the reference draws too: mean_log_q_at_reference


def test_cli_reports_an_unknown_model_clearly(capsys):
    assert main(["compare", "no_such_model", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "unknown model 'no_such_model'" in error and "funnel" in error and "path/to/file.py:function" in error


def test_models_are_listed_with_descriptions(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in list_models():
        assert name in out
    assert {"banana", "funnel", "gaussian_mixture", "regression_scaled", "autoregression"} <= set(list_models())


def test_load_model_from_a_user_file(tmp_path):
    path = tmp_path / "my_model.py"
    path.write_text("import pyro, pyro.distributions as dist\ndef model():\n    pyro.sample('x', dist.Normal(0., 1.))\nLOG_Z = 0.0\n")
    source = load_model(f"{path}:model")
    assert callable(source.model) and source.LOG_Z == 0.0 and source.sample_posterior is None
    with pytest.raises(ValueError, match="defines no function 'missing'"):
        load_model(f"{path}:missing")
    with pytest.raises(ValueError, match="no model file"):
        load_model(f"{tmp_path}/absent.py:model")


def _two_d_normal(location):
    def model():
        import pyro
        import pyro.distributions as dist
        import torch

        pyro.sample("x", dist.Normal(torch.full((2,), location), 1.0).to_event(1))

    return model


def test_nuts_reference_reports_convergence_and_is_cached(tmp_path):
    import torch

    from vi_flows.reference import nuts_reference

    model = _two_d_normal(0.0)
    draws, report = nuts_reference(model, num_samples=150, warmup_steps=150, quiet=True, cache_dir=tmp_path)
    assert draws["x"].shape == (300, 2) and report["converged"] and not report["cached"]
    assert report["worst_rhat"] < 1.05 and report["smallest_ess"] > 100
    again, report_again = nuts_reference(model, num_samples=150, warmup_steps=150, quiet=True, cache_dir=tmp_path)
    assert report_again["cached"] and torch.equal(again["x"], draws["x"])
    # Other settings are another key: no stale reference.
    _, other = nuts_reference(model, num_samples=120, warmup_steps=150, quiet=True, cache_dir=tmp_path)
    assert not other["cached"]


def test_nuts_reference_chooses_its_threads_and_restores_the_callers(tmp_path, monkeypatch):
    import torch

    from vi_flows import reference

    timed, seen = [], []
    monkeypatch.setattr(reference, "fastest_threads", lambda step: timed.append(step()) or 1)
    original_mcmc = reference.MCMC

    def spying_mcmc(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original_mcmc(*args, **kwargs)

    monkeypatch.setattr(reference, "MCMC", spying_mcmc)
    callers = torch.get_num_threads()
    model = _two_d_normal(0.0)
    _, report = reference.nuts_reference(model, num_samples=20, warmup_steps=20, quiet=True, cache_dir=tmp_path)
    assert timed and report["num_threads"] == 1 and seen == [1, 1] and torch.get_num_threads() == callers
    _, report = reference.nuts_reference(model, num_samples=20, warmup_steps=20, quiet=True, cache_dir=tmp_path / "b", threads=2)
    assert report["num_threads"] == 2 and seen[-1] == 2 and torch.get_num_threads() == callers


def test_nuts_reference_warns_when_it_did_not_converge(tmp_path):
    from vi_flows.reference import nuts_reference

    with pytest.warns(UserWarning, match="may not have converged"):
        _, report = nuts_reference(_two_d_normal(1.0), num_samples=10, warmup_steps=10, quiet=True, cache_dir=tmp_path)
    assert not report["converged"]


def test_the_reference_cache_key_follows_the_data_a_model_reads(tmp_path):
    from vi_flows.reference import cache_key

    source = (
        "import pyro, pyro.distributions as dist, torch\n"
        "g = torch.Generator().manual_seed({seed})\n"
        "X = torch.randn(30, 2, generator=g)\n"
        "y = torch.tensor({labels}).repeat(15)\n"
        "def model():\n"
        "    w = pyro.sample('w', dist.Normal(torch.zeros(2), 1.0).to_event(1))\n"
        "    with pyro.plate('data', 30):\n"
        "        pyro.sample('y', dist.Bernoulli(logits=(X * w).sum(-1)), obs=y)\n"
    )
    keys = []
    for name, seed, labels in [("a", 0, [0.0, 1.0]), ("b", 1, [0.0, 1.0]), ("c", 0, [1.0, 0.0]), ("d", 0, [0.0, 1.0])]:
        path = tmp_path / f"{name}.py"
        path.write_text(source.format(seed=seed, labels=labels))
        keys.append(cache_key(load_model(f"{path}:model").model, (), {}, ("settings",)))
    # Same source: other covariates (a module global the trace does not record) or other observations
    # are other keys; the same data is the same key.
    assert len(set(keys[:3])) == 3 and keys[3] == keys[0]


def test_cli_refuses_bad_arguments_before_any_work(tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr("vi_flows.report.compare", no_work)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for argv, message in [
        (["--out", str(a_file)], "is a file, not a folder"),
        (["--out", str(a_file / "below")], "cannot be made"),
        (["--guides", "meanfield", "planar*x"], "--guides 'planar*x': malformed flow spec"),
    ]:
        assert main(["compare", "banana", *argv]) == 2
        error = capsys.readouterr().err.strip()
        assert message in error and len(error.splitlines()) == 1, error
    for steps in ("0", "-5"):
        with pytest.raises(SystemExit) as exit_:
            main(["compare", "banana", "--steps", steps])
        assert exit_.value.code == 2 and "must be a positive whole number" in capsys.readouterr().err


def test_cli_exits_nonzero_when_every_guide_failed(tmp_path, capsys):
    # Pyro's Gaussian autoguides cannot initialise the mixture's ImproperUniform sites.
    code = main(["compare", "gaussian_mixture", "--guides", "meanfield", "fullrank", "--steps", "5", "--out", str(tmp_path), "--quiet"])
    captured = capsys.readouterr()
    assert code == 1 and "every guide failed" in captured.err
    assert "meanfield failed: NotImplementedError" in captured.out and "fullrank failed" in captured.out


def test_cli_says_in_one_line_where_a_model_failed(tmp_path, capsys):
    path = tmp_path / "broken.py"
    path.write_text("import pyro, pyro.distributions as dist\ndef model():\n    x = pyro.sample('x', dist.Normal(0., 1.))\n    raise ValueError('no data loaded')\n")
    assert main(["compare", f"{path}:model", "--steps", "5", "--out", str(tmp_path / "out"), "--quiet"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "ValueError: no data loaded" in error[0] and f"{path}:4" in error[0], error


def test_cli_draws_the_marginals_it_is_asked_for(tmp_path, capsys):
    argv = ["compare", "banana", "--guides", "planar", "--steps", "5", "--quiet"]
    assert main([*argv, "--parameters", "x2", "--out", str(tmp_path / "one")]) == 0
    assert (tmp_path / "one" / "marginals.png").stat().st_size > 0
    assert main([*argv, "--parameters", "nope", "--out", str(tmp_path / "none")]) == 0
    assert "no marginals.png: no parameter 'nope'; the model's are x1, x2" in capsys.readouterr().out


def test_cli_table_fits_a_hundred_columns_unless_wide(tmp_path, capsys):
    argv = ["compare", "banana", "--guides", "meanfield", "planar*2", "--steps", "5", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "narrow")]) == 0
    narrow = [line for line in capsys.readouterr().out.splitlines() if "planar*2" in line or line.lstrip().startswith("guide")]
    assert max(map(len, narrow)) <= 100, narrow
    assert main([*argv, "--wide", "--out", str(tmp_path / "wide")]) == 0
    wide = capsys.readouterr().out
    assert "log_q_ref" in wide and "khat_draws" in wide


def test_help_starts_without_loading_torch():
    import subprocess
    import sys

    code = "import sys; from vi_flows.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_the_reference_keeps_its_chains_in_arviz():
    reference = banana.sample_posterior(400)
    result = compare(banana.model, guides=("planar",), reference=reference, num_steps=5, num_draws=100, quiet=True)
    result.reference_report = {"num_chains": 2}  # as nuts_reference reports two chains of 200
    posterior = result.inference_data(num_samples=50)["reference"].posterior
    assert posterior.sizes["chain"] == 2 and posterior.sizes["draw"] == 200


def test_compare_on_a_subsampled_model_scores_what_it_can_and_says_what_it_cannot():
    import pyro
    import pyro.distributions as dist
    from pyro.infer.autoguide import AutoNormal

    data = torch.randn(60)

    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        with pyro.plate("groups", len(data), subsample_size=20) as index:
            theta = pyro.sample("theta", dist.Normal(mu, 1.0))
            pyro.sample("y", dist.Normal(theta, 1.0), obs=data[index])

    result = compare(model, guides=("meanfield", "fullrank", "planar"), num_steps=20, num_draws=200, quiet=True)
    assert "NUTS cannot run" in result.reference_skipped and not result.reference
    assert isinstance(result.guides["meanfield"], AutoNormal)  # a parameter per item, read by subsample
    assert "cannot be fitted a subsample at a time" in str(result.errors["fullrank"])
    table = result.table.loc[["meanfield", "planar"]]
    assert np.isfinite(table["elbo"]).all() and table["khat"].isna().all() and table["iw_elbo"].isna().all()
