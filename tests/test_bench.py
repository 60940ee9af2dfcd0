"""The benchmark script runs end to end on a tiny budget (its figures are not checked here)."""

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
