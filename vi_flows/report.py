"""The ``vi-flows compare`` job: run :func:`vi_flows.compare` on a model, write its files, and hand
the lines to show (model, reference, table, failures, files) to the caller's ``say``."""

import re
from pathlib import Path

import pyro

from . import plots
from .compare import compare
from .messages import first_line
from .models import reference_moments

# Guide draws behind the main job's mean and sd errors where exact moments are known: a few seconds
# per guide; the funnel's x sds still vary by 5-15% at this count (the benchmarks take 10^7).
COMPARE_MOMENT_DRAWS = 1_000_000

# Every column of the table: (header, format). The printed table keeps NARROW, which fits 100
# characters; --wide prints all of them, and table.csv and table.md hold all of them.
COLUMNS = {
    "elbo": ("elbo", "{:.3f}"),
    "elbo_se": ("elbo_se", "{:.3f}"),
    "iw_elbo": ("iw_elbo", "{:.3f}"),
    "kl": ("kl", "{:.3f}"),
    "khat": ("khat", "{:.2f}"),
    "khat_draws": ("khat_draws", "{:.0f}"),
    "khat_reading": ("reading", "{}"),
    "worst_mean_error": ("mean_err", "{:.3f}"),
    "sd_ratio_min": ("sd_min", "{:.3f}"),
    "sd_ratio_max": ("sd_max", "{:.3f}"),
    "mean_log_q_at_reference": ("log_q_ref", "{:.3f}"),
    "rollbacks": ("rollbacks", "{:.0f}"),
    "steps": ("steps", "{:.0f}"),
    "fit_seconds": ("seconds", "{:.1f}"),
    "ms_per_step": ("ms_step", "{:.2f}"),
}
NARROW = ("elbo", "kl", "khat", "khat_reading", "worst_mean_error", "sd_ratio_min", "sd_ratio_max", "steps", "fit_seconds")


def format_table(table, columns=tuple(COLUMNS)):
    """The table as text rows (header first), numbers rounded for reading; columns with no value left out."""
    shown = [column for column in columns if column in table and table[column].notna().any()]
    rows = [["guide", *(COLUMNS[column][0] for column in shown)]]
    for guide, row in table.iterrows():
        rows.append([guide, *("" if row[c] != row[c] else COLUMNS[c][1].format(row[c]) for c in shown)])  # NaN -> ""
    return rows


def markdown(rows):
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows[1:]]) + "\n"


def plain_text(rows):
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows)


def run_compare(
    model_spec, source, guides, say, num_steps=None, out="vi-flows-compare", quiet=False, wide=False, parameters=None, seed=0, num_draws=4096
):
    """Fit ``guides`` to ``source.model`` (a zoo model or ``path.py:function``, loaded by
    :func:`vi_flows.zoo.load_model`), print the table and write ``table.csv``, ``parameters.csv``,
    ``table.md``, ``elbo_traces.png``, ``khat.png``, ``marginals.png`` and one ArviZ netCDF file per
    fitted guide and one for the reference (``reference.nc``, NUTS chains kept) to the folder ``out``;
    ``parameters`` picks the marginals' panels. Every line to show goes to ``say`` (``print``, in the CLI)."""
    out, sample_posterior = Path(out), getattr(source, "sample_posterior", None)
    pyro.set_rng_seed(seed)  # the same reference draws, so the same table, on every run
    reference = sample_posterior(num_draws) if sample_posterior is not None else "nuts"
    kind = "exact posterior draws" if sample_posterior is not None else "Pyro's NUTS"
    say(f"model: {model_spec} ({source.DESCRIPTION}); reference: {kind}")
    result = compare(
        source.model,
        guides=guides,
        reference=reference,
        log_z=getattr(source, "LOG_Z", None),
        num_steps=num_steps,
        seed=seed,
        num_draws=num_draws,
        quiet=quiet,
        # Where exact draws exist, means and sds are scored against exact moments from many draws.
        reference_moments=reference_moments(source) if sample_posterior is not None else None,
        moment_draws=COMPARE_MOMENT_DRAWS if sample_posterior is not None else None,
    )
    if result.reference_skipped:
        say(f"no reference: {result.reference_skipped}")
    if result.reference_report:
        report = result.reference_report
        made = "from the cache" if report["cached"] else f"in {report['seconds']:.1f} s"
        say(f"NUTS reference {made}: worst R-hat {report['worst_rhat']:.3f}, smallest bulk ESS {report['smallest_ess']:.0f}")
    say(plain_text(format_table(result.table, COLUMNS if wide else NARROW)))
    for name, error in result.errors.items():
        say(f"{name} failed: {first_line(error)}")
    say(f"wrote {', '.join(_write(result, out, parameters, say))} to {out}/")
    return result


def _write(result, out, parameters, say):
    rows = format_table(result.table)
    result.table.to_csv(out / "table.csv")
    result.parameters.to_csv(out / "parameters.csv", index=False)
    (out / "table.md").write_text(markdown(rows))
    plots.elbo_traces(result, out / "elbo_traces.png")
    plots.khat(result, out / "khat.png")
    written = ["table.csv", "parameters.csv", "table.md", "elbo_traces.png", "khat.png"]
    if result.reference and result.guides:
        try:
            plots.marginals(result, out / "marginals.png", parameters)
            written.append("marginals.png")
        except ValueError as error:  # --parameters named none of the model's
            say(f"no marginals.png: {error}")
    try:
        for name, data in result.inference_data(num_samples=1000).items():
            filename = re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".nc"
            data.to_netcdf(out / filename)
            written.append(filename)
    except Exception as error:  # the table and plots are already written; say what is missing
        say(f"no InferenceData written ({first_line(error)})")
    return written


def run_fit(model, flow, local, out, say, num_steps=None, seed=0, progress=True):
    """The ``vi-flows fit`` job: fit ``AutoFlow(model, flow, local=local)`` with :func:`vi_flows.fit`
    (data-parallel where ``torchrun`` started several ranks: every rank fits, rank 0 reports), hand
    the summary and the global latents' medians to ``say``, and write ``guide.pt`` to ``out``: the
    guide's ``state_dict`` and Pyro's param store (a ``PyroModule`` model's weights)."""
    import torch

    from .autoflow import DEFAULT_FLOW, AutoFlow
    from .data_parallel import rank
    from .draws import quantiles
    from .fitting import fit

    pyro.clear_param_store()
    guide = AutoFlow(model, flow=flow or DEFAULT_FLOW, local=local)
    result = fit(model, guide, num_steps=num_steps, seed=seed, progress=progress)
    if rank() != 0:
        return result
    recent = result.losses[-100:]
    say(f"{result.num_steps} steps in {result.seconds:.1f} s ({result.stop_reason}); ELBO {-sum(recent) / max(len(recent), 1):.6g}")
    for name, value in quantiles(guide, [0.5], local=False).items():  # the globals'
        if value.numel() <= 12:
            say(f"median {name}: {[round(v, 4) for v in value.reshape(-1).tolist()]}")
    torch.save({"guide": guide.state_dict(), "params": pyro.get_param_store().get_state()}, out / "guide.pt")
    say(f"wrote guide.pt to {out}/")
    return result
