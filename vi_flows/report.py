"""The ``vi-flows compare`` job: run :func:`vi_flows.compare` on a model and write its results."""

import re
from pathlib import Path

import numpy
import pyro
import torch
from matplotlib.figure import Figure

from .compare import compare
from .draws import sample_constrained
from .models import reference_moments
from .zoo import load_model

# Guide draws behind the main job's mean and sd errors where exact moments are known: a few seconds
# per guide; the funnel's x sds still vary by 5-15% at this count (the benchmarks take 10^7).
COMPARE_MOMENT_DRAWS = 1_000_000

COLUMNS = {
    "elbo": "{:.3f}",
    "elbo_se": "{:.3f}",
    "iw_elbo": "{:.3f}",
    "kl": "{:.3f}",
    "khat": "{:.2f}",
    "khat_reading": "{}",
    "worst_mean_error": "{:.3f}",
    "sd_ratio_min": "{:.3f}",
    "sd_ratio_max": "{:.3f}",
    "mean_log_q_at_reference": "{:.3f}",
    "steps": "{:.0f}",
    "fit_seconds": "{:.1f}",
    "ms_per_step": "{:.2f}",
}


def format_table(table):
    """The table as text rows (header first), numbers rounded for reading."""
    header = ["guide", *(column for column in COLUMNS if column in table)]
    rows = [header]
    for guide, row in table.iterrows():
        cells = [guide]
        for column in header[1:]:
            value = row[column]
            cells.append("" if value != value else COLUMNS[column].format(value))  # NaN -> empty
        rows.append(cells)
    return rows


def markdown(rows):
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows[1:]]) + "\n"


def plain_text(rows):
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows)


def plot_elbo_traces(result, path):
    figure = Figure(figsize=(7, 4))
    axis = figure.subplots()
    for name, fitted in result.fits.items():
        losses = torch.tensor(fitted.losses)
        window = max(1, min(100, len(losses) // 20))
        smoothed = -losses.unfold(0, window, 1).mean(-1) if len(losses) >= window else -losses
        axis.plot(range(window, window + len(smoothed)), smoothed, label=name)
    axis.set(xlabel="step", ylabel="ELBO (moving average)", title="ELBO traces")
    finite = [-min(f.losses) for f in result.fits.values() if f.losses]
    if finite:
        top = max(finite)
        axis.set_ylim(top - 5 * max(1.0, abs(top) * 0.1), top + 0.5 * max(1.0, abs(top) * 0.05))
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot_khat(result, path):
    table = result.table.dropna(subset=["khat"]) if "khat" in result.table else result.table.iloc[:0]
    figure = Figure(figsize=(6, 3.5))
    axis = figure.subplots()
    values = table["khat"].clip(lower=-0.5, upper=2.0) if len(table) else []
    axis.bar(list(table.index), values, color=["tab:green" if k < 0.5 else "tab:orange" if k < 0.7 else "tab:red" for k in values])
    for level, label in ((0.5, "good below"), (0.7, "do not trust above")):
        axis.axhline(level, color="grey", linestyle="--", linewidth=1)
        axis.text(-0.4, level + 0.02, label, fontsize=8, color="grey")
    axis.set(ylabel="PSIS k-hat", title="Importance-sampling reliability of each guide")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _scalar_columns(draws, limit):
    """Up to ``limit`` scalar parameters of a draws dict as ``(label, site, flat index)``."""
    columns = []
    for name, values in draws.items():
        for index in range(values[0].numel()):
            columns.append((name if values[0].dim() == 0 else f"{name}[{index}]", name, index))
    return columns[:limit]


def _flat(values, index):
    return values.reshape(values.shape[0], -1)[:, index].cpu().numpy()


def plot_marginals_and_pairs(result, path, max_parameters=6, num_draws=4000):
    """Each guide's marginals over the reference's (top rows) and a pair plot of the first two
    parameters (bottom row), all in the model's constrained space."""
    columns = _scalar_columns(result.reference, max_parameters)
    draws = {name: sample_constrained(guide, num_draws) for name, guide in result.guides.items()}
    width = max(len(columns), len(draws) + 1)
    figure = Figure(figsize=(3 * width, 6))
    axes = figure.subplots(2, width, squeeze=False)
    for axis, (label, site, index) in zip(axes[0], columns):
        reference = _flat(result.reference[site], index)
        low, high = numpy.quantile(reference, [0.005, 0.995])
        bins = numpy.linspace(low, high, 50)
        axis.hist(reference, bins=bins, density=True, color="lightgrey", label="reference")
        for name, values in draws.items():
            axis.hist(_flat(values[site], index), bins=bins, density=True, histtype="step", linewidth=1.5, label=name)
        axis.set_title(label)
    if columns:
        axes[0][0].legend(fontsize=7)
    if len(columns) >= 2:
        (x_label, x_site, x_index), (y_label, y_site, y_index) = columns[:2]
        panels = {"reference": result.reference, **draws}
        # Every panel on the reference's range, so the shapes compare at a glance.
        x_range = numpy.quantile(_flat(result.reference[x_site], x_index), [0.005, 0.995])
        y_range = numpy.quantile(_flat(result.reference[y_site], y_index), [0.005, 0.995])
        for axis, (name, values) in zip(axes[1], panels.items()):
            axis.scatter(_flat(values[x_site], x_index)[:2000], _flat(values[y_site], y_index)[:2000], s=2, alpha=0.3)
            axis.set(title=name, xlabel=x_label, ylabel=y_label, xlim=x_range, ylim=y_range)
    for axis in [*axes[0][len(columns):], *axes[1][len(draws) + 1 if len(columns) >= 2 else 0:]]:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def run_compare(model_spec, guides, num_steps=None, out="vi-flows-compare", quiet=False, seed=0, num_draws=4096):
    """Fit ``guides`` to a zoo model (or ``path.py:function``), print the table and write
    ``table.csv``, ``parameters.csv``, ``table.md``, ``elbo_traces.png``, ``khat.png``,
    ``marginals.png`` (marginals and a pair plot over the reference) and one ArviZ netCDF file per
    fitted guide and one for the reference (``reference.nc``) to ``out``."""
    source = load_model(model_spec)
    sample_posterior = getattr(source, "sample_posterior", None)
    pyro.set_rng_seed(seed)  # the same reference draws, so the same table, on every run
    reference = sample_posterior(num_draws) if sample_posterior is not None else "nuts"
    if not quiet:
        kind = "exact posterior draws" if sample_posterior is not None else "Pyro's NUTS"
        print(f"model: {model_spec} ({source.DESCRIPTION}); reference: {kind}")
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
    if result.reference_report:
        report = result.reference_report
        source = "from the cache" if report["cached"] else f"in {report['seconds']:.1f} s"
        print(f"NUTS reference {source}: worst R-hat {report['worst_rhat']:.3f}, smallest bulk ESS {report['smallest_ess']:.0f}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = format_table(result.table)
    print(plain_text(rows))
    result.table.to_csv(out / "table.csv")
    result.parameters.to_csv(out / "parameters.csv", index=False)
    (out / "table.md").write_text(markdown(rows))
    plot_elbo_traces(result, out / "elbo_traces.png")
    plot_khat(result, out / "khat.png")
    written = ["table.csv", "parameters.csv", "table.md", "elbo_traces.png", "khat.png"]
    if result.reference and result.guides:
        plot_marginals_and_pairs(result, out / "marginals.png")
        written.append("marginals.png")
    try:
        for name, data in result.inference_data(num_samples=1000).items():
            filename = re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".nc"
            data.to_netcdf(out / filename)
            written.append(filename)
    except Exception as error:  # the table and plots are already written; say what is missing
        print(f"no InferenceData written ({type(error).__name__}: {str(error).splitlines()[0]})")
    for name, error in result.errors.items():
        print(f"{name} failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    print(f"wrote {', '.join(written)} to {out}/")
    return result
