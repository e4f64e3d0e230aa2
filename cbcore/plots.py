"""Plotly figures for the notebooks. Functions here take arrays/tables (from cbcore
functions) and return `plotly.graph_objects.Figure`; no computation beyond layout."""

from __future__ import annotations

import plotly.io as pio


def setup_plotly() -> None:
    """Make figures render in executed notebooks and their HTML.

    With plotly >= 6.1 under papermill, figures come out blank unless the renderer is set;
    "notebook" embeds plotly.js in the notebook output, so the HTML needs no CDN.
    """
    pio.renderers.default = "notebook"


# --- CIFAR (notebooks/cifar.ipynb): inputs come from cbcore.cifar.epoch_curves/layer_curves/final_table

METHOD_COLORS = {"bp": "#1f77b4", "dfa": "#d62728", "state_bridge": "#2ca02c",
                 "credit_bridge": "#9467bd"}


def cifar_accuracy(test: dict, train: dict | None = None, title: str = "Accuracy per epoch"):
    """Test accuracy (solid) and train accuracy (dotted) per method over epochs.
    `test`, `train`: method -> (epochs, values), as from `cbcore.cifar.epoch_curves`."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, (epochs, vals) in test.items():
        color = METHOD_COLORS.get(name)
        fig.add_scatter(x=epochs, y=vals, name=f"{name} test", mode="lines+markers",
                        line={"color": color}, legendgroup=name)
        if train and name in train:
            fig.add_scatter(x=train[name][0], y=train[name][1], name=f"{name} train",
                            mode="lines", line={"color": color, "dash": "dot"}, legendgroup=name)
    fig.update_layout(title=title, xaxis_title="epoch", yaxis_title="accuracy",
                      template="plotly_white", height=420)
    return fig


def cifar_layer_cosine(curves: dict, metric: str = "cos", title: str | None = None):
    """Per-layer diagnostic over epochs, one panel per method, one line per layer (dark =
    layer 0, light = last). `curves`: method -> (epochs, [layer][epoch]) from `layer_curves`."""
    import plotly.colors as pc
    from plotly.subplots import make_subplots

    names = list(curves)
    if not names:
        import plotly.graph_objects as go

        return go.Figure(layout={"title": f"no {metric} diagnostics in these rows"})
    fig = make_subplots(rows=1, cols=max(len(names), 1), shared_yaxes=True,
                        subplot_titles=names, horizontal_spacing=0.03)
    for col, name in enumerate(names, start=1):
        epochs, layers = curves[name]
        n = len(layers)
        colors = pc.sample_colorscale("Viridis", [i / max(n - 1, 1) for i in range(n)])
        for l, vals in enumerate(layers):
            fig.add_scatter(x=epochs, y=vals, mode="lines+markers", name=f"layer {l:02d}",
                            line={"color": colors[l]}, legendgroup=f"layer {l:02d}",
                            showlegend=col == 1, row=1, col=col)
        fig.update_xaxes(title_text="epoch", row=1, col=col)
    fig.update_yaxes(title_text=f"{metric} with ∂ℓ/∂h_l", row=1, col=1)
    fig.update_layout(title=title or f"Per-layer {metric} over epochs (fixed diagnostic batch)",
                      template="plotly_white", height=380)
    return fig


def cifar_final_table(table: list[dict], title: str = "Final metrics per method"):
    """A plotly table of `cbcore.cifar.final_table` rows (numbers to 4 places)."""
    import plotly.graph_objects as go

    cols = list(table[0]) if table else []

    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))

    fig = go.Figure(go.Table(header={"values": cols},
                             cells={"values": [[fmt(r[c]) for r in table] for c in cols]}))
    fig.update_layout(title=title, height=120 + 30 * len(table), margin={"t": 40, "b": 10})
    return fig
