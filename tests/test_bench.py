"""The benchmark script runs end to end on a tiny budget (its figures are not checked here)."""

import pytest

from vi_flows import bench


def test_speed_table_has_a_row_per_family(capsys):
    bench.speed(dims=(3,), rounds=1, steps=1)
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [row.split()[1] for row in rows] == list(bench.SPECS)


def test_kl_table_reports_pyro_failures_without_stopping(capsys):
    bench.kl(targets=("gaussian_mixture",), steps=2)
    rows = capsys.readouterr().out.splitlines()[2:]
    assert len(rows) == len(bench.SPECS)
    # Pyro's autoguides cannot initialise ImproperUniform sites; ours can.
    assert all("fails: NotImplementedError" in row and row.split()[2] != "fails:" for row in rows)


def test_fit_table_runs_every_method(monkeypatch, capsys):
    monkeypatch.setattr(bench, "_default_fit", lambda module, seed: ({"x": module.sample_posterior(100)["x"]}, 1, 0.0))
    bench.fitting(targets=("gaussian_mixture",))
    rows = capsys.readouterr().out.splitlines()[2:]
    assert len(rows) == 3
    # Neither Pyro's autoguides nor its NUTS can initialise ImproperUniform; the table says so.
    assert "fails: NotImplementedError" in rows[0] and "fails: NotImplementedError" in rows[2]
    assert "fails" not in rows[1]


@pytest.mark.filterwarnings("ignore:the NUTS reference may not have converged")
def test_nuts_table_scores_deterministic_sites_of_the_reference_model(capsys, tmp_path):
    # The centred eight schools against the non-centred model, whose theta is a pyro.deterministic site.
    bench.fitting_against_nuts(
        targets={"eight_schools": "eight_schools_noncentered"}, num_samples=10, warmup_steps=10, num_steps=5, cache_dir=tmp_path
    )
    row = capsys.readouterr().out.splitlines()[2].split()
    assert row[:2] == ["eight_schools", "eight_schools_noncentered"] and row[-2] == "5"


def test_sticking_the_landing_table_has_a_row_per_setting_and_seed(capsys):
    bench.sticking(targets=("banana",), seeds=(0,), dims=(2,), steps=1, num_steps=5)
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[0] == "2" and len(lines) == 7
    assert [row.split()[:3] for row in lines[5:]] == [["banana", "False", "0"], ["banana", "True", "0"]]


def test_choose_table_has_a_row_per_flow_target_and_seed(capsys):
    bench.choose(specs=("planar*2", "iaf"), targets=("banana",), seeds=(0, 1), num_steps=5)
    rows = [row.split()[:3] for row in capsys.readouterr().out.splitlines()[2:]]
    assert rows == [[spec, "banana", seed] for spec in ("planar*2", "iaf") for seed in ("0", "1")]
