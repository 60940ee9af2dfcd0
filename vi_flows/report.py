"""The ``vi-flows compare`` job: run :func:`vi_flows.compare` on a model and write its results."""

import re
from pathlib import Path

import torch

from .arviz_export import to_inference_data
from .compare import compare
from .zoo import load_model

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
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
    plt.close(figure)


def plot_khat(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = result.table.dropna(subset=["khat"]) if "khat" in result.table else result.table.iloc[:0]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    values = table["khat"].clip(lower=-0.5, upper=2.0) if len(table) else []
    axis.bar(list(table.index), values, color=["tab:green" if k < 0.5 else "tab:orange" if k < 0.7 else "tab:red" for k in values])
    for level, label in ((0.5, "good below"), (0.7, "do not trust above")):
        axis.axhline(level, color="grey", linestyle="--", linewidth=1)
        axis.text(-0.4, level + 0.02, label, fontsize=8, color="grey")
    axis.set(ylabel="PSIS k-hat", title="Importance-sampling reliability of each guide")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_compare(model_spec, guides, num_steps=None, out="vi-flows-compare", quiet=False, seed=0, num_draws=4096):
    """Fit ``guides`` to a zoo model (or ``path.py:function``), print the table and write
    ``table.csv``, ``parameters.csv``, ``table.md``, ``elbo_traces.png``, ``khat.png`` and one ArviZ netCDF file per
    fitted guide to ``out``."""
    source = load_model(model_spec)
    sample_posterior = getattr(source, "sample_posterior", None)
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
    )
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
    for name, guide in result.guides.items():
        filename = re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".nc"
        try:
            to_inference_data(guide, source.model, num_samples=1000).to_netcdf(out / filename)
            written.append(filename)
        except Exception as error:  # the table and plots are already written; say what is missing
            print(f"{name}: no InferenceData written ({type(error).__name__}: {str(error).splitlines()[0]})")
    if quiet:  # compare() has already said so otherwise
        for name, error in result.errors.items():
            print(f"{name} failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    print(f"wrote {', '.join(written)} to {out}/")
    return result
