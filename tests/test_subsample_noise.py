"""How noisy a subsampled fit's steps are for the globals (:mod:`vi_flows.autoflow.subsample_noise`),
and ``fit``'s warning where they are too noisy to trust."""

import math
import warnings

import pyro
import pytest

from vi_flows import AutoFlow, fit
from vi_flows.subsample_checks import MAX_SUBSAMPLE_NOISE

from test_local import PER_GROUP, TAU, closed_form, fixed_tau_model, grouped_data

GROUPS = 2000


def expected_noise(data, subsample):
    """The sd over subsamples of N / B times the subsample's summed slope of each group mean's
    log-density in mu, (mean - mu) / v, times mu's posterior sd: with tau known, the exact noise."""
    marginal_variance = TAU**2 + 1 / PER_GROUP
    mean, sd = closed_form(data)["mu"]
    slopes = (data.double().mean(-1) - mean) / marginal_variance
    groups = len(data)
    spread = groups / math.sqrt(subsample) * slopes.std(correction=0) * math.sqrt((groups - subsample) / (groups - 1))
    return float(spread * sd)


@pytest.mark.parametrize("subsample", [20, 200])
def test_the_noise_of_a_subsampled_step_in_mu_is_the_closed_forms(fresh_param_store, subsample):
    """About sqrt(N / B) posterior sds; measured over 32 subsamples (a relative sd of about 13%)."""
    pyro.set_rng_seed(0)
    data = grouped_data(GROUPS)
    guide = AutoFlow(fixed_tau_model, local="per-item").setup(data, subsample)  # its start is exact here
    noise = guide.subsample_noise(data, subsample)
    assert list(noise) == ["mu"]
    assert noise["mu"].item() == pytest.approx(expected_noise(data, subsample), rel=0.3)
    # A guide not yet set up sets itself up; without subsampling there is no such noise.
    assert list(AutoFlow(fixed_tau_model, local="per-item", name="fresh").subsample_noise(data, subsample)) == ["mu"]
    assert AutoFlow(fixed_tau_model, local="per-item", name="full").subsample_noise(data) == {}


def test_fit_reports_the_noise_and_warns_where_it_is_too_large(fresh_param_store):
    """Without the control variate: a warning at B = 5, none at 400. With it (the default) the slope
    in mu is linear with the same curvature in every item here: what is left at B = 5 is the items' rows moving since the anchor."""
    data = grouped_data(GROUPS)
    options = dict(num_steps=20, progress=False, seed=0, control_variate=False)
    with pytest.warns(UserWarning, match=r"slope in 'mu' by about \d+ of its posterior sds"):
        noisy = fit(fixed_tau_model, AutoFlow(fixed_tau_model, local="per-item"), data, 5, **options)
    assert noisy.subsample_noise > MAX_SUBSAMPLE_NOISE
    for subsample, control_variate, bound in [(400, False, MAX_SUBSAMPLE_NOISE), (5, "auto", 0.1)]:
        pyro.clear_param_store()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            quiet = fit(fixed_tau_model, AutoFlow(fixed_tau_model, local="per-item"), data, subsample, **{**options, "control_variate": control_variate})
        assert 0 < quiet.subsample_noise < bound
        assert not [warning for warning in record if "posterior sds" in str(warning.message)]
    assert fit(fixed_tau_model, AutoFlow(fixed_tau_model, local="per-item", name="full"), data, num_steps=20, progress=False).subsample_noise == 0
