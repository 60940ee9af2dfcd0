"""Large plates' subsamples in O(B) (:mod:`vi_flows.subsampling`): the law of Pyro's draw."""

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from vi_flows.subsampling import MIN_RATIO, MIN_SUBSAMPLE, FastSubsamples, distinct_uniform, uniform_subsample


def test_a_draw_is_distinct_in_range_and_uniform_over_items_and_positions():
    torch.manual_seed(0)
    count, draws = 20, 20000
    size = MIN_RATIO * count
    samples = torch.stack([distinct_uniform(size, count) for _ in range(draws)])
    assert samples.shape == (draws, count) and samples.min() >= 0 and samples.max() < size
    assert all(len(set(row.tolist())) == count for row in samples)
    # Each item comes up count / size of the time, and as often at each position (chi-square, 5 sds).
    for counts, expected in ((torch.bincount(samples.flatten(), minlength=size), draws * count / size),
                             (torch.bincount(samples[:, 0], minlength=size), draws / size)):
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert abs(chi2 - (size - 1)) < 5 * (2 * (size - 1)) ** 0.5


def test_large_subsampled_plates_draw_fast_and_the_rest_as_pyro_does():
    def model(size, count):
        with pyro.plate("items", size, subsample_size=count) as index:
            pyro.sample("x", dist.Normal(torch.zeros(len(index)), 1.0))

    large = (MIN_RATIO * MIN_SUBSAMPLE, MIN_SUBSAMPLE)
    for size, count, fast in [(*large, True), (MIN_RATIO * MIN_SUBSAMPLE - 1, MIN_SUBSAMPLE, False), (10**5, MIN_SUBSAMPLE - 1, False)]:
        torch.manual_seed(1)
        ours = poutine.trace(FastSubsamples()(model)).get_trace(size, count).nodes["items"]["value"]
        torch.manual_seed(1)
        theirs = poutine.trace(model).get_trace(size, count).nodes["items"]["value"]
        assert len(set(ours.tolist())) == count
        assert torch.equal(ours, theirs) != fast
    given = torch.arange(MIN_SUBSAMPLE)
    traced = poutine.trace(FastSubsamples()(poutine.condition(model, {"items": given}))).get_trace(*large)
    assert torch.equal(traced.nodes["items"]["value"], given)


def test_a_uniform_subsample_is_drawn_in_order_b_where_safe_and_by_permutation_elsewhere():
    for size, count in ((MIN_RATIO * MIN_SUBSAMPLE, MIN_SUBSAMPLE), (100, 30)):
        torch.manual_seed(0)
        drawn = uniform_subsample(size, count)
        assert len(drawn) == count and len(drawn.unique()) == count and 0 <= drawn.min() and drawn.max() < size
    torch.manual_seed(0)
    expected = torch.randperm(100)[:30]
    torch.manual_seed(0)
    assert torch.equal(uniform_subsample(100, 30), expected)
