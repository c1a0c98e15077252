"""`dvc plots show` renders with no network: the page template in `.dvc/config` inlines Vega,
Vega-Lite and Vega-Embed and loads nothing from elsewhere; the plot templates in `.dvc/plots/`
fill without leftover anchors. No DVC command runs: the pages are made with `dvc_render`,
the library `dvc plots show` calls."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from configobj import ConfigObj
from dvc_render import VegaRenderer, render_html

from conftest import REPO

PLOTS = REPO / ".dvc" / "plots"
NETWORK_REFERENCE = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)
LIBRARIES = {  # the global each minified UMD build defines
    "vega": '(t="undefined"!=typeof globalThis?globalThis:t||self).vega={}',
    "vega-lite": ".vegaLite={}",
    "vega-embed": ".vegaEmbed=",
}


def html_template() -> Path:
    """The page template `.dvc/config` names (DVC resolves it against `.dvc/`)."""
    config = ConfigObj(str(REPO / ".dvc" / "config"))
    return REPO / ".dvc" / config["plots"]["html_template"]


def test_the_page_template_is_self_contained():
    page = html_template().read_text(encoding="utf-8")
    assert "{plot_divs}" in page
    # `{scripts}` is where DVC writes its <script src="https://cdn.jsdelivr.net/..."> tags.
    assert "{scripts}" not in page
    assert not NETWORK_REFERENCE.search(page)
    for package, umd_global in LIBRARIES.items():
        assert f"/* {package}@" in page, f"{package} is not inlined"
        assert umd_global in page, f"{package}'s build does not define its global"


def learning_curve_points(rev: str) -> list[dict]:
    """Datapoints as DVC passes them for `y: {file: [train_loss, val_loss]}`."""
    return [
        {
            "epoch": str(epoch),
            "dvc_inferred_y_value": str(value),
            "rev": rev,
            "filename": "train/history.csv",
            "field": field,
        }
        for field, values in (("train_loss", (0.9, 0.5)), ("val_loss", (1.0, 0.7)))
        for epoch, value in enumerate(values, start=1)
    ]


def prediction_points(rev: str) -> list[dict]:
    pairs = [("cat", "cat"), ("cat", "dog"), ("dog", "dog")]
    return [{"actual": a, "predicted": p, "rev": rev} for a, p in pairs]


@pytest.mark.parametrize(
    ("template", "points", "properties"),
    [
        (
            "learning_curve",
            learning_curve_points,
            {"x": "epoch", "y": "dvc_inferred_y_value", "x_label": "epoch", "y_label": "loss"},
        ),
        (
            "confusion_matrix",
            prediction_points,
            {
                "x": "predicted",
                "y": "actual",
                "x_label": "Predicted label",
                "y_label": "True label",
            },
        ),
    ],
)
def test_plot_templates_fill_and_render_offline(tmp_path: Path, template, points, properties):
    renderer = VegaRenderer(
        points("HEAD") + points("workspace"),
        "plot",
        template=template,
        template_dir=str(PLOTS),
        title="a plot",
        **properties,
    )
    spec = renderer.get_filled_template()
    assert "<DVC_METRIC_" not in json.dumps(spec)
    assert spec["title"]["text"] == "a plot"

    page = Path(render_html([renderer], tmp_path / "index.html", str(html_template())))
    written = page.read_text(encoding="utf-8")
    assert "vegaEmbed('#plot', spec)" in written
    assert "cdn.jsdelivr.net" not in written and not NETWORK_REFERENCE.search(written)
