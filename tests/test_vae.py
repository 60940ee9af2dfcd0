"""The digits VAE job: every named posterior fits and is scored, the files are written, bad input is one line."""

import pytest

from vi_flows.cli import main
from vi_flows.models import vae_digits
from vi_flows.vae import POSTERIORS


def test_the_digits_are_binarised_and_split_the_same_way_every_time():
    train, test = vae_digits.train_images(), vae_digits.test_images()
    assert train.shape == (1500, 64) and test.shape == (297, 64)
    assert set(train.unique().tolist()) == {0.0, 1.0}
    assert 0.2 < train.mean() < 0.45
    assert not (train[:, None, :] == test[None, :8, :]).all(-1).any(0).all()  # held out, not copies


def test_the_vae_job_fits_scores_and_plots_each_posterior(tmp_path, capsys, fresh_param_store):
    assert main(["vae", "--posteriors", "gaussian", "sylvester-orthogonal", "--epochs", "2", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "test log-lik" in out and "sylvester-orthogonal" in out
    for name in ("table.md", "reconstructions.png", "prior_samples.png", "elbo_per_epoch.png"):
        assert (tmp_path / name).stat().st_size > 0
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n") == 4  # header, rule, two posteriors


def test_the_vae_job_rejects_bad_input_in_one_line(tmp_path, capsys):
    assert main(["vae", "--posteriors", "gaussian", "sylvester*x", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert "malformed flow spec" in error and len(error.splitlines()) == 1
    with pytest.raises(SystemExit) as exit_:
        main(["vae", "--epochs", "0"])
    assert exit_.value.code == 2 and "must be a positive whole number" in capsys.readouterr().err


def test_every_posterior_of_the_table_is_a_valid_spec():
    from vi_flows.registry import parse_spec

    for spec in filter(None, POSTERIORS.values()):
        parse_spec(spec)
