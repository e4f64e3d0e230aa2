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
