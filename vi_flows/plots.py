"""The plots of ``vi-flows compare``, drawn on matplotlib ``Figure`` objects (no global backend)."""

import numpy
import torch
from matplotlib.figure import Figure

from .draws import sample_constrained

# marginals() draws at most this many parameters' panels by default, and says so in its title.
MAX_PANELS = 12


def elbo_traces(result, path):
    """Each guide's ELBO (a moving average of its fit's losses) against the step."""
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
    if result.fits:
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def khat(result, path):
    """Each guide's PSIS k-hat against the 0.5 and 0.7 thresholds, labelled beside the axes."""
    table = result.table.dropna(subset=["khat"]) if "khat" in result.table else result.table.iloc[:0]
    figure = Figure(figsize=(7, 3.5))
    axis = figure.subplots()
    values = table["khat"].clip(lower=-0.5, upper=2.0) if len(table) else []
    axis.bar(list(table.index), values, color=["tab:green" if k < 0.5 else "tab:orange" if k < 0.7 else "tab:red" for k in values])
    for level, label in ((0.5, "good below"), (0.7, "do not trust above")):
        axis.axhline(level, color="grey", linestyle="--", linewidth=1)
        axis.text(1.01, level, label, fontsize=8, color="grey", va="center", transform=axis.get_yaxis_transform())
    axis.set(ylabel="PSIS k-hat", title="Importance-sampling reliability of each guide")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _scalar_columns(draws):
    """Every scalar parameter of a draws dict as ``(label, site, flat index)``."""
    columns = []
    for name, values in draws.items():
        for index in range(values[0].numel()):
            columns.append((name if values[0].dim() == 0 else f"{name}[{index}]", name, index))
    return columns


def _flat(values, index):
    return values.reshape(values.shape[0], -1)[:, index].cpu().numpy()


def marginals(result, path, parameters=None, num_draws=4000):
    """Each guide's marginals over the reference's, one panel a scalar parameter (``parameters``:
    their labels, default the first ``MAX_PANELS``, the title says of how many), each on the
    central 95% of all draws, so that the shapes can be told apart however heavy the tails."""
    columns = _scalar_columns(result.reference)
    missing = sorted(set(parameters or ()) - {label for label, _, _ in columns})
    if missing:
        raise ValueError(f"no parameter {', '.join(map(repr, missing))}; the model's are {', '.join(label for label, _, _ in columns)}")
    shown = [column for column in columns if parameters is None or column[0] in parameters][: None if parameters else MAX_PANELS]
    draws = {name: sample_constrained(guide, num_draws) for name, guide in result.guides.items()}
    width = min(4, len(shown))
    rows = -(-len(shown) // width)
    figure = Figure(figsize=(3.2 * width, 2.6 * rows + 0.8))
    axes = figure.subplots(rows, width, squeeze=False).reshape(-1)
    for axis, (label, site, index) in zip(axes, shown):
        samples = {"reference": _flat(result.reference[site], index), **{name: _flat(d[site], index) for name, d in draws.items()}}
        low, high = numpy.quantile(numpy.concatenate(list(samples.values())), [0.025, 0.975])
        bins = numpy.linspace(low, high, 40)
        for name, values in samples.items():
            style = dict(color="lightgrey") if name == "reference" else dict(histtype="step", linewidth=1.5)
            axis.hist(values[(values >= low) & (values <= high)], bins=bins, density=True, label=name, **style)
        axis.set_title(label, fontsize=9)
        axis.set_yticks([])
    for axis in axes[len(shown) :]:
        axis.axis("off")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    of = f"{len(shown)} of {len(columns)} parameters" if len(shown) < len(columns) else "every parameter"
    figure.suptitle(f"Marginals over the reference ({of}; central 95% of all draws)", fontsize=10)
    figure.tight_layout(rect=(0, 0.06, 1, 0.97))
    figure.savefig(path, dpi=100)


def image_rows(rows, path, title):
    """``rows`` (``{label: (n, height, width)}`` of grey levels in [0, 1]) as labelled rows of images."""
    width = max(len(images) for images in rows.values())
    figure = Figure(figsize=(0.8 * width + 1.6, 0.8 * len(rows) + 0.5))
    axes = figure.subplots(len(rows), width, squeeze=False)
    for row, (label, images) in zip(axes, rows.items()):
        for axis, image in zip(row, images):
            axis.imshow(image.cpu().numpy(), cmap="gray_r", vmin=0.0, vmax=1.0)
        for axis in row:
            axis.set_xticks([])
            axis.set_yticks([])
            axis.spines[:].set_visible(False)
        row[0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def curves(series, path, xlabel, ylabel, title):
    """``series`` (``{label: 1-D tensor}``) against their index from 1, one line each."""
    figure = Figure(figsize=(7, 4))
    axis = figure.subplots()
    for label, values in series.items():
        axis.plot(range(1, len(values) + 1), values.cpu().numpy(), label=label, linewidth=1)
    finite = torch.cat([values[len(values) // 10 :] for values in series.values()])
    if len(finite):  # the early epochs' ELBO is far below: show where the posteriors differ
        axis.set_ylim(finite.min().item(), finite.max().item() + 0.05 * (finite.max() - finite.min()).item())
    axis.set(xlabel=xlabel, ylabel=ylabel, title=title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
