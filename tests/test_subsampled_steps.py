"""``fit``'s step where items are many: Adam steps the per-item tables lazily
(:mod:`vi_flows.item_steps`), and on a subsampled plate the clip follows the noise (:mod:`vi_flows.clipping`).
The compiled step's agreement with these eager steps is in ``test_compiled_step.py``."""

import pytest
import torch
from pyro.infer.autoguide import AutoGuideList

from vi_flows import AutoFlow
from vi_flows.clipping import NOISE_CLIP, clip_gradient
from vi_flows.compiled_elbo import trace_negative_elbo
from vi_flows.compiled_step import CompiledAdamStep
from vi_flows.elbo_step import ELBOStep
from vi_flows.subsampling import FastSubsamples

from test_local import grouped_data, latent_tau_model

GROUPS, SUBSAMPLE = 1000, 50


def test_the_start_leaves_no_gradient_on_the_tables(fresh_param_store):
    """The globals' Laplace start differentiates through the tables: a gradient left on them was
    added to the first eager step's own (16,384 rows of size ~70 at N = 10^5)."""
    guide = AutoFlow(latent_tau_model, local="per-item").setup(grouped_data(GROUPS), SUBSAMPLE)
    assert guide.init_used == "laplace"
    assert all(table.grad is None for table in guide.item_tables())


def test_a_step_leaves_the_items_outside_its_subsample_and_their_moments_alone(fresh_param_store):
    """Plain Adam kept stepping every row on its last visit's momentum (about ten times that visit's
    step) and moved rows of round-off gradient as far as others: at N = 10^5 they wandered by up to
    0.28 and pulled tau low. Lazily, a row moves in the steps that hold its item, and only then."""
    guide = AutoFlow(latent_tau_model, local="per-item")
    step = ELBOStep(latent_tau_model, guide, grouped_data(GROUPS), SUBSAMPLE, num_particles=8, max_plate_nesting=2, sticking_the_landing=True, threads=1)
    tables = guide.item_tables()
    assert len(tables) == 2 and all(table.shape == (GROUPS,) for table in tables)
    assert [id(table) for table in step.tables] == [id(table) for table in tables]
    for _ in range(3):
        before = [table.detach().clone() for table in tables]
        moments = [step.optimizer.state[table]["exp_avg"].clone() if step.optimizer.state.get(table) else torch.zeros_like(table) for table in tables]
        step(1e-2)
        for table, old, moment in zip(tables, before, moments):
            moved = table != old
            assert 0 < moved.sum() <= SUBSAMPLE  # the subsample's items, at most
            assert torch.equal(step.optimizer.state[table]["exp_avg"][~moved], moment[~moved])


def test_an_autoguidelist_holding_autoflow_steps_its_tables_lazily_too(fresh_param_store):
    """The list draws the plates' subsamples for its parts: AutoFlow's locals read them (before, the
    model's plate drew its own, and the trace held two sites named after the plate). The tables
    were looked up on the guide itself only, so a list of guides would have got plain Adam."""
    guide = AutoGuideList(latent_tau_model)
    guide.append(AutoFlow(latent_tau_model, local="per-item"))
    # The list offers none of AutoFlow's subsampled-fit methods: fit says what the part goes without.
    with pytest.warns(UserWarning, match=r"local posteriors of \['theta'\] \(the guide's part '0'\) on subsamples without the control variate, the items' refits"):
        step = ELBOStep(latent_tau_model, guide, grouped_data(GROUPS), SUBSAMPLE, num_particles=8, max_plate_nesting=2, threads=1)
    tables = guide[0].item_tables()
    assert len(tables) == 2 and [id(table) for table in step.tables] == [id(table) for table in tables]
    before = [table.detach().clone() for table in tables]
    step(1e-2)
    step(1e-2)
    assert all(0 < (table != old).sum() <= 2 * SUBSAMPLE for table, old in zip(tables, before))


@pytest.mark.parametrize("local", ["per-item", "amortized"])
def test_the_compiled_step_computes_nothing_as_large_as_the_items(fresh_param_store, local):
    """Its cost follows the subsample, not the items: in the whole step (loss, gradient, clip, Adam),
    only the writes of the per-item tables' rows read, in place, reach a tensor the size of a table.
    Before, the tables' gradients were dense, the precisions' exp and the lazy update's masks ran over
    every row, and an amortised guide's plate drew its subsample by ``randperm(N)`` (per step at
    N = 10^3 and 10^6: per-item 0.68 and 9.3 ms, amortised 0.83 and 8.2 ms)."""
    groups, subsample = 8000, 100  # a subsample drawn in O(B) (vi_flows.subsampling); 8 x 100 x 5 data < 8000
    data = grouped_data(groups)
    guide = AutoFlow(latent_tau_model, local=local)
    step = ELBOStep(latent_tau_model, guide, data, subsample, num_particles=8, max_plate_nesting=2, sticking_the_landing=True, threads=1)

    def large_operations(item_tables):
        graph = trace_negative_elbo(latent_tau_model, FastSubsamples()(guide), step.params, step.particles, data, subsample, sticking_the_landing=True, item_tables=item_tables, gradients=True)
        whole_step = CompiledAdamStep(graph, step.params, step.optimizer, step.clip_norm, step.tables, step.subsampled, backend=None)._graphs[0]
        values = [(node.target, node.meta.get("val")) for node in whole_step.graph.nodes if node.op == "call_function"]
        return {str(target) for target, value in values if isinstance(value, torch.Tensor) and value.numel() >= groups}

    if local == "amortized":
        assert large_operations(()) == set()
        return
    assert large_operations(step.tables) == {"aten.index_copy_.default"}
    assert "aten.where.self" in large_operations(())  # the tables read whole: masked over every row


def test_the_clip_follows_the_noise_on_a_subsampled_plate_only():
    gradient = torch.tensor([3.0, 30.0, 80.0, -80.0])
    square, step = torch.full((4,), 100.0), torch.tensor(1001.0, dtype=torch.float64)  # a running rms of about 10
    assert clip_gradient(gradient, square, step, 0.999, 10.0, False).tolist() == [3.0, 10.0, 10.0, -10.0]
    bound = NOISE_CLIP * (100.0 / (1 - 0.999**1000)) ** 0.5
    assert clip_gradient(gradient, square, step, 0.999, 10.0, True).tolist() == pytest.approx([3.0, 30.0, bound, -bound])
    # Before any second moment, and where the noise is small, the fixed bound holds.
    assert clip_gradient(gradient, torch.zeros(4), torch.tensor(1.0, dtype=torch.float64), 0.999, 10.0, True).tolist() == [3.0, 10.0, 10.0, -10.0]
