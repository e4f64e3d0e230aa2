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


# --- diagnostics & summary (notebooks/diagnostics.ipynb, notebooks/summary.ipynb): inputs come
# from cbcore.analysis (Grid, nudge_data, value_vs_loss, final_stats, curve_bands, layer_bands)

NUDGE_COLORS = {"true": "#222222", "random": "#999999"}


def _cell(v) -> str:
    """A table cell: floats to 4 places, Stats as `mean ± std (n=…)`, lists joined."""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, list):
        return ", ".join(map(str, v)) or "-"
    return "-" if v is None else str(v)


def stats_table(table: list[dict], title: str = ""):
    """A plotly table of rows (e.g. `cbcore.analysis.final_stats`, `seed_table`,
    `known_answers_table`); an empty table gives a figure that says so."""
    import plotly.graph_objects as go

    if not table:
        return _empty(f"{title}: nothing to show")
    cols = list(table[0])
    cells = [[_cell(r.get(c)) for r in table] for c in cols]
    widths = [max(len(c), *(min(len(v), 60) for v in col)) for c, col in zip(cols, cells)]
    chars = [w * 1000 / 7 / sum(widths) for w in widths]  # characters per line at ~1000 px
    lines = [max(1, *(-(-len(col[i]) // max(int(n), 1)) for col, n in zip(cells, chars)))
             for i in range(len(table))]
    fig = go.Figure(go.Table(columnwidth=widths,
                             header={"values": cols, "align": "left"},
                             cells={"values": cells, "align": "left", "height": 24}))
    fig.update_layout(title=title, height=110 + 24 * sum(lines), margin={"t": 40, "b": 10})
    return fig


def _empty(title: str):
    """A figure that only says something (no axes)."""
    import plotly.graph_objects as go

    return go.Figure(layout={"title": title, "height": 100, "xaxis": {"visible": False},
                             "yaxis": {"visible": False}, "template": "plotly_white",
                             "margin": {"t": 40, "b": 10}})


def _grid_z(grid) -> tuple[list, dict]:
    """Heatmap values and color settings: cosines, correlations and efficiencies on [-1, 1]
    (0 = useless), rho on a log scale from 0.1 to 10 (1 = BP's scale)."""
    import numpy as np

    if grid.name.endswith("rho"):
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.log10(grid.values)
        ticks = {"tickvals": [-1, -0.5, 0, 0.5, 1], "ticktext": ["0.1", "0.3", "1", "3", "10"]}
        return z.tolist(), {"zmin": -1.0, "zmax": 1.0, "colorscale": "PuOr", "colorbar": ticks}
    return grid.values.tolist(), {"zmin": -1.0, "zmax": 1.0, "colorscale": "RdBu"}


def layer_epoch_heatmaps(grids: list, title: str | None = None, mark: tuple | None = None):
    """One heatmap per `cbcore.analysis.Grid` (layer × epoch), side by side; `mark`: an
    (epoch, layer) to outline (the explorer's selection)."""
    from plotly.subplots import make_subplots

    grids = [g for g in grids if g.values.size]
    if not grids:
        return _empty("no per-layer diagnostics logged")
    fig = make_subplots(rows=1, cols=len(grids), subplot_titles=[g.name for g in grids],
                        horizontal_spacing=0.1)
    for i, g in enumerate(grids, start=1):
        z, colors = _grid_z(g)
        axis = fig.layout["xaxis" if i == 1 else f"xaxis{i}"]
        bar = {"x": axis.domain[1] + 0.005, "len": 0.9, "thickness": 10,  # beside its panel
               **colors.pop("colorbar", {})}
        hover = "%{customdata:.4g}" if g.name.endswith("rho") else "%{z:.4f}"
        fig.add_heatmap(x=[str(e) for e in g.epochs], y=g.layers.tolist(), z=z,
                        customdata=g.values.tolist(), colorbar=bar,
                        hovertemplate="epoch %{x}<br>layer %{y}<br>" + hover + "<extra></extra>",
                        **colors, row=1, col=i)
        if mark is not None and mark[0] in g.epochs:
            fig.add_scatter(x=[str(mark[0])], y=[mark[1]], mode="markers", showlegend=False,
                            marker={"symbol": "square-open", "size": 18, "color": "black"},
                            row=1, col=i)
        fig.update_xaxes(title_text="epoch", type="category", row=1, col=i)
    fig.update_yaxes(dtick=1)
    fig.update_yaxes(title_text="layer l", row=1, col=1)
    fig.update_layout(title=title or f"{grids[0].method}: per layer over epochs",
                      template="plotly_white", height=360)
    return fig


def alignment_lines(grids: dict, title: str | None = None):
    """cos and rho per layer, one line per checkpoint epoch (dark = early, light = late).
    `grids`: {"cos": Grid, "rho": Grid} from `cbcore.analysis.checkpoint_grids`."""
    import plotly.colors as pc
    from plotly.subplots import make_subplots

    names = list(grids)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, horizontal_spacing=0.08)
    for col, name in enumerate(names, start=1):
        g = grids[name]
        E = len(g.epochs)
        colors = pc.sample_colorscale("Viridis", [j / max(E - 1, 1) for j in range(E)])
        for j, epoch in enumerate(g.epochs):
            fig.add_scatter(x=g.layers.tolist(), y=g.values[:, j].tolist(), mode="lines+markers",
                            name=f"epoch {epoch}", legendgroup=f"epoch {epoch}",
                            showlegend=col == 1, line={"color": colors[j]}, row=1, col=col)
        fig.update_xaxes(title_text="layer l", dtick=1, row=1, col=col)
        if name == "rho":
            fig.update_yaxes(type="log", row=1, col=col)
    method = next(iter(grids.values())).method if grids else ""
    fig.update_layout(title=title or f"{method}: credit vs ∂ℓ/∂h_l at the checkpoints",
                      template="plotly_white", height=340)
    return fig


def nudge_curves(curves: list[dict], title: str | None = None):
    """Loss change vs ε after h_l ← h_l − ε‖h_l‖·dir/‖dir‖, along the credit, the true gradient
    and a random direction; one panel per layer. `curves`: `cbcore.analysis.nudge_data` dicts."""
    import numpy as np
    from plotly.subplots import make_subplots

    if not curves:
        return _empty("no nudge curves")

    def label(c) -> str:
        eff = c["efficiency"][np.isfinite(c["efficiency"])]
        span = f"{eff.min():.2f}…{eff.max():.2f}" if eff.size else "nan"
        return f"layer {c['layer']}: efficiency {span}"

    fig = make_subplots(rows=1, cols=len(curves), subplot_titles=[label(c) for c in curves],
                        shared_yaxes=False, horizontal_spacing=0.06)
    method = curves[0]["method"]
    styles = {"credit": (method, {"color": METHOD_COLORS.get(method, "#1f77b4")}),
              "true": ("∂ℓ/∂h_l (BP)", {"color": NUDGE_COLORS["true"], "dash": "dash"}),
              "random": ("random", {"color": NUDGE_COLORS["random"], "dash": "dot"})}
    for col, c in enumerate(curves, start=1):
        for key, (name, line) in styles.items():
            fig.add_scatter(x=c["eps"].tolist(), y=c[key].tolist(), name=name, legendgroup=key,
                            mode="lines+markers", line=line, showlegend=col == 1, row=1, col=col,
                            hovertemplate="ε %{x:.3g}<br>Δℓ %{y:.4g}<extra>" + name + "</extra>")
        fig.update_xaxes(title_text="ε", type="log", row=1, col=col)
    fig.update_yaxes(title_text="Δ loss", row=1, col=1)
    fig.update_layout(title=title or f"{method}, epoch {curves[0]['epoch']}: nudge curves",
                      template="plotly_white", height=360)
    return fig


def value_vs_loss(data: list[dict], title: str | None = None):
    """The credit bridge's value V_φ(h_l, l, y) against the realized loss ℓ, one point per
    example, one panel per layer, with the line V = ℓ. `data`: `analysis.value_vs_loss` dicts."""
    from plotly.subplots import make_subplots

    if not data:
        return _empty("no value network")
    fig = make_subplots(rows=1, cols=len(data), horizontal_spacing=0.06,
                        subplot_titles=[f"layer {d['layer']}: corr {d['corr']:.3f}" for d in data])
    for col, d in enumerate(data, start=1):
        lo = float(min(d["loss"].min(), d["value"].min()))
        hi = float(max(d["loss"].max(), d["value"].max()))
        fig.add_scatter(x=d["loss"].tolist(), y=d["value"].tolist(), mode="markers",
                        marker={"size": 4, "opacity": 0.6,
                                "color": METHOD_COLORS.get(d["method"], "#9467bd")},
                        name="examples", showlegend=col == 1, row=1, col=col)
        fig.add_scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="V = ℓ",
                        line={"color": "black", "dash": "dash"}, showlegend=col == 1,
                        row=1, col=col)
        fig.update_xaxes(title_text="realized loss ℓ", row=1, col=col)
    fig.update_yaxes(title_text="V_φ(h_l, l, y)", row=1, col=1)
    fig.update_layout(title=title or f"{data[0]['method']}, epoch {data[0]['epoch']}: "
                      "value vs realized loss", template="plotly_white", height=360)
    return fig


def _band(fig, x, mean, std, name: str, color: str | None, **where) -> None:
    """A mean line with a shaded ±std band (no band where std is NaN, i.e. n < 2)."""
    import numpy as np

    lo, hi = mean - np.nan_to_num(std), mean + np.nan_to_num(std)
    fig.add_scatter(x=list(x) + list(x)[::-1], y=list(hi) + list(lo)[::-1], fill="toself",
                    line={"width": 0}, fillcolor=color, opacity=0.2, hoverinfo="skip",
                    showlegend=False, legendgroup=name, **where)
    fig.add_scatter(x=list(x), y=list(mean), name=name, mode="lines+markers", legendgroup=name,
                    line={"color": color}, **where)


def band_curves(bands: dict, key: str, x: str = "epoch", title: str | None = None):
    """Mean ± std over seeds of a logged metric, one line and band per method; the legend
    gives n. `bands`: `cbcore.analysis.curve_bands`."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for method, b in bands.items():
        n = int(b["n"].max()) if b["n"].size else 0
        _band(fig, b["x"], b["mean"], b["std"], f"{method} (n={n})", METHOD_COLORS.get(method))
    fig.update_layout(title=title or f"{key}: mean ± std over seeds", xaxis_title=x,
                      yaxis_title=key, template="plotly_white", height=400)
    return fig


def layer_band_figure(bands: dict, prefix: str = "cos", title: str | None = None):
    """A per-layer diagnostic at the end of training, mean ± std over seeds per method.
    `bands`: `cbcore.analysis.layer_bands`."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for method, b in bands.items():
        n = int(b["n"].max()) if b["n"].size else 0
        _band(fig, b["layers"], b["mean"], b["std"], f"{method} (n={n})",
              METHOD_COLORS.get(method))
    fig.update_layout(title=title or f"Final per-layer {prefix} with ∂ℓ/∂h_l: mean ± std over seeds",
                      xaxis_title="layer l", yaxis_title=prefix, template="plotly_white",
                      height=400, xaxis_dtick=1)
    return fig


class DiagnosticsExplorer:
    """ipywidgets over a `cbcore.analysis.RunDiagnostics`: method, checkpoint epoch, layer and
    ε range drive the nudge curves, the layer × epoch heatmaps of cos and rho (selection
    outlined) and, for the credit bridge, value vs realized loss. The widget callbacks are
    this class's methods; `figures()` gives the current figures without displaying them."""

    def __init__(self, diag, method: str | None = None, log_eps: tuple = (-3.0, -0.5),
                 n_eps: int = 9) -> None:
        import ipywidgets as w

        self.diag, self.n_eps = diag, n_eps
        method = method if method in diag.methods else diag.methods[0]
        epochs = diag.epochs(method)
        self.method = w.Dropdown(options=diag.methods, value=method, description="method")
        self.epoch = w.Dropdown(options=epochs, value=epochs[-1], description="epoch")
        self.layer = w.IntSlider(value=0, min=0, max=diag.num_layers - 1, description="layer")
        self.log_eps = w.FloatRangeSlider(value=log_eps, min=-4.0, max=0.5, step=0.1,
                                          description="log₁₀ ε", readout_format=".1f")
        self.outputs = {name: w.Output() for name in ("nudge", "maps", "value")}
        self._quiet = False
        self.method.observe(self.on_method, names="value")
        for c in (self.epoch, self.layer, self.log_eps):
            c.observe(self.on_change, names="value")
        self.widget = w.VBox([w.HBox([self.method, self.epoch]), w.HBox([self.layer, self.log_eps]),
                              *self.outputs.values()])
        self.widget.explorer = self
        self.render()

    def on_method(self, change) -> None:
        """A new method: its own checkpoint epochs (the last one selected), then redraw."""
        self._quiet = True
        try:
            epochs = self.diag.epochs(change["new"])
            self.epoch.options = epochs
            self.epoch.value = epochs[-1]
        finally:
            self._quiet = False
        self.render()

    def on_change(self, change) -> None:
        if not self._quiet:
            self.render()

    def figures(self) -> dict:
        """The figures for the current selection: nudge, maps, value (None if no value net)."""
        from cbcore import analysis

        m, e, l = self.method.value, self.epoch.value, self.layer.value
        probe = self.diag.probe(m, e)
        lo, hi = (10.0**v for v in self.log_eps.value)
        out = {"nudge": nudge_curves([analysis.nudge_data(probe, l, analysis.log_grid(lo, hi, self.n_eps))]),
               "maps": layer_epoch_heatmaps(
                   [analysis.layer_epoch_grid(self.diag.rows, m, p) for p in ("cos", "rho")],
                   title=f"{m}: cos and rho per layer over the logged epochs", mark=(e, l)),
               "value": None}
        if hasattr(probe.credit_method, "V"):
            out["value"] = value_vs_loss([analysis.value_vs_loss(probe, l)])
        return out

    def render(self) -> None:
        """Redraw. Each Output widget's outputs are set directly: output capture (`with out:`)
        makes papermill's client send the captured outputs back to the kernel, and that can
        hang the execution (jupyter/nbclient#312)."""
        figs = self.figures()
        for name, out in self.outputs.items():
            if figs[name] is not None:
                out.outputs = (figure_output(figs[name]),)
            else:
                text = f"{self.method.value} has no value network (value vs loss: credit_bridge)"
                out.outputs = ({"output_type": "stream", "name": "stdout", "text": text + "\n"},)


def figure_output(fig) -> dict:
    """A display_data output of a figure, for an Output widget's state: plotly's mimetype,
    which JupyterLab draws with its plotly extension (no plotly.js in the output)."""
    import plotly.io as pio

    data = pio.renderers["plotly_mimetype"].to_mimebundle(fig.to_dict())
    data["text/plain"] = f"<plotly figure: {fig.layout.title.text}>"
    return {"output_type": "display_data", "data": data, "metadata": {}}


def diagnostics_explorer(diag, method: str | None = None):
    """The explorer's widget, to display in a notebook (its `.explorer` is the object)."""
    return DiagnosticsExplorer(diag, method).widget


# --- toy LQ (notebooks/toy_lq.ipynb): inputs come from cbcore.toy_lq.layer_curves/metric_curves


def toy_layer_curves(curves: dict, metric: str = "cos", against: str = "∂ℓ/∂h_l",
                     title: str | None = None):
    """A per-layer metric over training steps, one panel per method, one line per layer
    (dark = layer 0, light = last). `curves`: method -> (steps, [layer][step])."""
    import plotly.colors as pc
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = list(curves)
    if not names:
        return go.Figure(layout={"title": f"no {metric} in these rows", "height": 100})
    fig = make_subplots(rows=1, cols=len(names), shared_yaxes=True, subplot_titles=names,
                        horizontal_spacing=0.02)
    for col, name in enumerate(names, start=1):
        steps, layers = curves[name]
        n = len(layers)
        colors = pc.sample_colorscale("Viridis", [i / max(n - 1, 1) for i in range(n)])
        for l, vals in enumerate(layers):
            fig.add_scatter(x=steps, y=vals, mode="lines", name=f"layer {l:02d}",
                            line={"color": colors[l]}, legendgroup=f"layer {l:02d}",
                            showlegend=col == 1, row=1, col=col)
        fig.update_xaxes(title_text="step", row=1, col=col)
    fig.update_yaxes(title_text=f"{metric} vs {against}", row=1, col=1)
    fig.update_layout(title=title or f"Per-layer {metric} against {against} over training",
                      template="plotly_white", height=380)
    return fig


def toy_metric_curves(curves: dict, key: str, title: str | None = None, log_y: bool = False):
    """One logged scalar over training steps, one line per method.
    `curves`: method -> (steps, values), as from `cbcore.toy_lq.metric_curves`."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, (steps, vals) in curves.items():
        fig.add_scatter(x=steps, y=vals, mode="lines", name=name,
                        line={"color": METHOD_COLORS.get(name)})
    fig.update_layout(title=title or f"{key} over training", xaxis_title="step", yaxis_title=key,
                      template="plotly_white", height=380)
    if log_y:
        fig.update_yaxes(type="log")
    return fig
