"""The registry, the spec language and the ``vi-flows flows`` command."""

import subprocess
import sys

import pytest
import torch
from pyro.distributions.transforms import ComposeTransformModule

from vi_flows import (
    IAF,
    Householder,
    HouseholderSylvester,
    Planar,
    available_flows,
    build_flow,
    parse_spec,
    register_flow,
    registered_flow,
)
from vi_flows.cli import main
from vi_flows.flows.iaf import MAX_DEFAULT_HIDDEN_DIM


def test_parse_spec_reads_terms_counts_and_aliases():
    assert parse_spec("householder*4+planar*8") == [("householder", 4), ("planar", 8)]
    assert parse_spec(" planar * 2 + radial ") == [("planar", 2), ("radial", 1)]
    assert parse_spec("sylvester*16") == [("sylvester-householder", 16)]


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ("planar**2", "'planar**2'"),
        ("planar*0", "layer count '0' is not a positive integer"),
        ("planar*x", "layer count 'x'"),
        ("planar+", "term 2 ''"),
        ("", "non-empty string"),
        ("planar radial", "term 1 'planar radial'"),
    ],
)
def test_malformed_specs_point_at_the_bad_term(spec, fragment):
    with pytest.raises(ValueError, match="name\\[\\*K\\]") as error:
        parse_spec(spec)
    assert fragment in str(error.value)


def test_unknown_flow_lists_registered_flows_and_suggests():
    with pytest.raises(ValueError) as error:
        build_flow("planr*8", 3)
    message = str(error.value)
    assert "'planr'" in message and "did you mean 'planar'" in message
    for name in available_flows():
        assert name in message


def test_stacked_flow_is_one_module_and_spec_order_is_base_outward():
    flow = build_flow("planar*8", 3)
    assert isinstance(flow, Planar) and flow.num_layers == 8
    composed = build_flow("householder*4+planar*8", 3)
    assert isinstance(composed, ComposeTransformModule)
    assert [type(part) for part in composed.parts] == [Householder, Planar]
    x = torch.randn(5, 3)
    torch.testing.assert_close(composed(x), composed.parts[1](composed.parts[0](x)))


def test_build_flow_passes_family_and_shared_keyword_arguments():
    flow = build_flow("householder*2+iaf*2", 4, iaf={"hidden_dim": 7, "gated": True})
    assert isinstance(flow.parts[1], IAF) and flow.parts[1].hidden_dim == 7 and flow.parts[1].gated
    assert build_flow("sylvester", 6, num_reflections=3).num_reflections == 3
    assert isinstance(build_flow("sylvester", 6), HouseholderSylvester)
    with pytest.raises(TypeError):
        build_flow("planar", 3, hidden_dim=5)


def test_the_default_iaf_width_stops_growing_and_a_narrower_made_stays_exact():
    assert IAF(10).hidden_dim == 40 and IAF(400).hidden_dim == MAX_DEFAULT_HIDDEN_DIM
    torch.manual_seed(0)
    flow = IAF(12, num_layers=1, hidden_dim=4).double()
    with torch.no_grad():
        flow.output_weight.normal_()
    x = torch.randn(12, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(flow, x)
    assert torch.equal(jacobian.triu(1), torch.zeros_like(jacobian))  # autoregressive
    # Four hidden degrees spread over 1..11 rather than the first four: the last output sees input 9.
    assert jacobian[-1, 8] != 0
    torch.testing.assert_close(flow.log_abs_det_jacobian(x, flow(x)), torch.linalg.slogdet(jacobian)[1], atol=1e-10, rtol=0)
    torch.testing.assert_close(flow.inv(flow(x)), x, atol=1e-10, rtol=0)


def test_user_flow_that_is_not_stackable_is_composed():
    calls = []

    def counted(dim):
        """Counts its constructions."""
        calls.append(dim)
        return build_flow("householder", dim)

    with registered_flow("test-counted-affine", counted):
        flow = build_flow("test-counted-affine*3", 2)
        assert calls == [2, 2, 2] and len(flow.parts) == 3
        assert available_flows()["test-counted-affine"] == "Counts its constructions."
    # Scoped: gone after the block, and a replaced built-in comes back.
    assert "test-counted-affine" not in available_flows()
    with registered_flow("planar", counted):
        assert available_flows()["planar"] == "Counts its constructions."
    assert available_flows()["planar"].startswith("z + u tanh")


def test_registering_a_taken_or_bad_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_flow("planar")(Planar)
    with pytest.raises(ValueError, match="lower-case"):
        register_flow("Bad Name")


def test_cli_lists_every_flow_with_a_description(capsys):
    assert main(["flows"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in available_flows():
        line = next(line for line in lines if line.split()[0] == name)
        assert len(line.split()) > 2


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "vi_flows.cli", "flows"], capture_output=True, text=True, check=True)
    assert "sylvester-triangular" in result.stdout and "alias of sylvester-householder" in result.stdout
