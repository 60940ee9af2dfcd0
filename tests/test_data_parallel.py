"""Data-parallel fitting on torch.distributed: two processes on this machine (gloo), launched by
torchrun, against one process. The worker is ``tests/data_parallel_worker.py``."""

import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch

from data_parallel_worker import FIT_ITEMS, REGRESSION_SUBSAMPLES, ROW_OFFSET, gradient_step, refreshed_step, regression_data, regression_step
from test_local import closed_form, grouped_data
from vi_flows import AutoFlow, to_inference_data
from vi_flows.data_parallel import Shard, ShardedSubsamples
from vi_flows.zoo import load_model

WORKER = Path(__file__).parent / "data_parallel_worker.py"


def run_ranks(mode, out, ranks=2):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", str(WORKER), mode, str(out)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(ranks)]


def test_sharded_subsamples_draw_each_ranks_own_items():
    seen = []
    for rank in range(3):
        with ShardedSubsamples(Shard(rank, 3)), pyro.plate("items", 30, subsample_size=4) as index:
            seen.append(index)
        assert (index % 3 == rank).all() and len(index.unique()) == 4
    # A large shard is drawn in O(B) (vi_flows.subsampling): still the rank's own items, distinct, in range.
    for rank in range(3):
        with ShardedSubsamples(Shard(rank, 3)), pyro.plate("items", 3 * 64 * 64 + 1, subsample_size=64) as index:
            assert (index % 3 == rank).all() and len(index.unique()) == 64 and 0 <= index.min() and index.max() <= 3 * 64 * 64
    with pytest.raises(ValueError, match="at most 10 per rank"):
        with ShardedSubsamples(Shard(0, 3)), pyro.plate("items", 30, subsample_size=11):
            pass


def test_the_all_reduced_gradient_is_the_mean_of_the_ranks_gradients(tmp_path, fresh_param_store):
    """Each rank's gradient is one process's on that rank's subsample (seeded seed + rank), so their
    mean, what every rank steps on, is the gradient of a subsample of both ranks' items."""
    reduced = run_ranks("gradient", tmp_path / "gradient")
    step = gradient_step()
    tables = {id(table) for table in step.tables}
    shared = [param for param in step.params if id(param) not in tables]
    per_rank = []
    for rank in range(2):
        pyro.set_rng_seed(rank)
        with ShardedSubsamples(Shard(rank, 2)):
            loss = step.loss()
        per_rank.append(torch.autograd.grad(loss, shared, allow_unused=True))
    expected = [(a if a is not None else 0) + (b if b is not None else 0) for a, b in zip(*per_rank)]
    for rank_gradients in reduced:
        assert len(rank_gradients) == len(shared)
        for got, want in zip(rank_gradients, expected):
            torch.testing.assert_close(got, torch.as_tensor(want).expand_as(got) / 2, rtol=1e-5, atol=1e-6)


def test_each_rank_refits_and_takes_the_slopes_of_its_own_items_and_shares_them(tmp_path, fresh_param_store):
    """Between runs of steps each rank refits its own items' rows and computes their slopes (41 items:
    shares of 21 and 20), and the ranks exchange them: every rank ends with what one process computes alone."""
    ranks = run_ranks("refresh", tmp_path / "refresh")
    step, before = refreshed_step()
    for table, offset in zip(step.tables, before):  # a conjugate item's refit undoes the offset
        assert ((table.detach() - offset).abs() - ROW_OFFSET).abs().max() < 0.5
    for rank_result in ranks:
        for got, want in zip(rank_result["tables"], step.tables):
            torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rank_result["slopes"], step.control_variate.slopes, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rank_result["total"], step.control_variate.total, rtol=1e-5, atol=1e-5)


def test_ranks_holding_their_own_data_step_as_one_process_on_all_of_it(tmp_path, fresh_param_store):
    """Each rank holds half of the items and weighs its subsample's twice: the ranks' mean loss and
    gradient at the same draws are one process's on both subsamples of all the items."""
    ranks = run_ranks("own-data-gradient", tmp_path / "own")
    x, y = regression_data()
    union = torch.cat([2 * torch.tensor(REGRESSION_SUBSAMPLES[0]), 2 * torch.tensor(REGRESSION_SUBSAMPLES[1]) + 1])
    step, _ = regression_step(x, y, union, start=ranks[0][0])
    loss = step.loss()
    loss.backward()
    for _, rank_loss, rank_gradients in ranks:
        torch.testing.assert_close(rank_loss, loss.detach(), rtol=1e-5, atol=1e-5)
        for got, param in zip(rank_gradients, step.params):
            torch.testing.assert_close(got, param.grad, rtol=1e-5, atol=1e-5)


def test_ranks_holding_their_own_data_need_a_subsampled_plate(fresh_param_store):
    x, y = regression_data()
    with pytest.raises(ValueError, match="this model subsamples no plate: give the plate of each rank's items a subsample_size"):
        regression_step(x, y, None, data_parallel="own-data")


@pytest.mark.slow
def test_ranks_holding_their_own_data_fit_the_closed_form(tmp_path):
    """Issue 19's criterion again, each rank holding only its half of the groups and their tables:
    the ranks end with the same globals, and each with its own groups' posteriors."""
    ranks = run_ranks("own-data-fit", tmp_path / "own-fit")
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["compiled"], ranks[0]["compile_failure"]
    tables = [name for name in ranks[0]["state"] if ".pseudo_observations." in name]
    assert tables and all(ranks[rank]["state"][name].numel() == FIT_ITEMS // 2 for name in tables for rank in range(2))
    for name in set(ranks[0]["state"]) - set(tables):
        torch.testing.assert_close(ranks[0]["state"][name], ranks[1]["state"][name], rtol=0, atol=0)
    # The end checks combine the ranks' (noise: root of the sum of squares; shift: the sum): one answer.
    assert ranks[0]["checks"] == ranks[1]["checks"] and all(0 <= value < 1 for value in ranks[0]["checks"])
    exact = closed_form(grouped_data(FIT_ITEMS))
    for rank, fitted in enumerate(ranks):
        for name, (mean, sd) in exact.items():
            mean = mean if name == "mu" else mean[rank::2]  # sd: the same for every group
            got_mean, got_sd = fitted["moments"][name]
            assert ((got_mean - mean) / sd).abs().max() < 0.1, (rank, name)
            assert ((got_sd / sd) - 1).abs().max() < 0.1, (rank, name)


@pytest.mark.slow
def test_a_two_process_fit_matches_the_closed_form_on_every_rank(tmp_path):
    """Issue 19's criterion for the subsampled per-item fit (every mean within 0.1 posterior sd, every
    sd within 10%), with each rank drawing from its half of the items; the ranks end with one guide."""
    ranks = run_ranks("fit", tmp_path / "fit")
    for name in ranks[0]["state"]:
        torch.testing.assert_close(ranks[0]["state"][name], ranks[1]["state"][name], rtol=0, atol=0)
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["compiled"], ranks[0]["compile_failure"]
    # Each rank checks the whole guide, from its own random draws: the same answer but for their noise.
    torch.testing.assert_close(torch.tensor(ranks[0]["checks"]), torch.tensor(ranks[1]["checks"]), rtol=0, atol=1e-3)
    for name, (mean, sd) in closed_form(grouped_data(FIT_ITEMS)).items():
        got_mean, got_sd = ranks[0]["moments"][name]
        assert ((got_mean - mean) / sd).abs().max() < 0.1, name
        assert ((got_sd / sd) - 1).abs().max() < 0.1, name


MODEL_FILE = '''
import pyro, pyro.distributions as dist, torch

DATA = 1.0 + torch.randn(200, generator=torch.Generator().manual_seed(0))

def model(subsample_size=20):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("groups", 200, subsample_size=subsample_size) as index:
        theta = pyro.sample("theta", dist.Normal(mu, 0.5))
        pyro.sample("y", dist.Normal(theta, 1.0), obs=DATA[index])
'''


def test_the_fit_command_runs_under_torchrun_and_saves_the_whole_guide(tmp_path, fresh_param_store):
    (tmp_path / "hierarchy.py").write_text(MODEL_FILE)
    spec, out = f"{tmp_path / 'hierarchy.py'}:model", tmp_path / "out"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "vi_flows.cli"]
    finished = subprocess.run([*launch, "fit", spec, "--flow", "affine", "--steps", "300", "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("median mu") == 1  # rank 0 alone reports
    saved = torch.load(out / "guide.pt", weights_only=False)
    source = load_model(spec)
    guide = AutoFlow(source.model, flow="affine").setup()
    guide.load_state_dict(saved["guide"])
    theta = guide.median()["theta"]
    assert theta.shape == (200,)
    # The loaded guide is the fitted one: its medians follow each group's datum.
    data = 1.0 + torch.randn(200, generator=torch.Generator().manual_seed(0))  # the file's
    assert torch.corrcoef(torch.stack([theta, data]))[0, 1] > 0.95
    # ArviZ from the saved guide, every group, on the model without subsampling.
    posterior = to_inference_data(guide, source.model, subsample_size=None, num_samples=50).posterior
    assert posterior["theta"].shape == (1, 50, 200)


def test_the_fit_command_runs_in_one_process_too(tmp_path, capsys, fresh_param_store):
    from vi_flows.cli import main

    assert main(["fit", "banana", "--steps", "20", "--out", str(tmp_path), "--quiet"]) == 0
    assert "median x1" in capsys.readouterr().out and (tmp_path / "guide.pt").stat().st_size > 0


def test_the_fit_command_reports_bad_input_in_one_line(tmp_path, capsys):
    from vi_flows.cli import main

    assert main(["fit", "no_such_model", "--out", str(tmp_path)]) == 2
    assert main(["fit", "banana", "--flow", "planar*x", "--out", str(tmp_path)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "unknown model 'no_such_model'" in errors[0] and "malformed flow spec" in errors[1]
