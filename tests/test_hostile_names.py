"""Class names are data: whatever a folder is called, it reaches Markdown, HTML, matplotlib,
pandas and the served model's output only through that medium's escaping layer, and comes
back exactly; names that only look different are one error naming both folders."""

from __future__ import annotations

import html
import io
import json
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt
from matplotlib.text import Text
from mlflow.pyfunc.scoring_server import predictions_to_json
from PIL import Image

from cnnpipe import images, plots, report, serving
from cnnpipe.errors import UserError
from cnnpipe.sources import list_folder

NASTY = [
    "<script>alert(1)</script>",
    "$\\frac{1}{0}$",
    "a|b",
    "class",
    "probability",
    "probability:class",
    "*bold* [link](x) `code`",
    "  spaced  ",
    "&amp;",
    "_hidden",
    "\\$",
]
# Names a file system can hold, with markup, TeX and table syntax over-represented.
NAMES = st.one_of(
    st.sampled_from(NASTY),
    st.text(alphabet=st.sampled_from("<>|$\\*_[]()`&#!-=~ \u00a0é\u0301ßİK"), min_size=1),
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40),
)
QUICK = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def markdown_cells(markdown: str) -> list[str]:
    rendered = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    return [html.unescape(cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", rendered, re.S)]


@QUICK
@given(NAMES)
def test_a_name_in_a_markdown_table_renders_as_itself(name):
    printable = images.safe_name(name)  # what a class name is, once read from a folder
    table = f"| class | n |\n|---|---|\n| {report.markdown_text(printable)} | 1 |\n"
    cells = markdown_cells(table)
    assert cells == [printable, "1"]
    assert "<script" not in MarkdownIt("commonmark", {"html": False}).render(table)


@QUICK
@given(NAMES)
def test_a_name_drawn_by_matplotlib_is_drawn_literally(name):
    printable = images.safe_name(name)
    assert Text()._preprocess_math(plots.shown(printable)) == (
        printable if not printable.startswith("_") else "\u200b" + printable,
        False,
    )


@QUICK
@given(st.lists(NAMES.map(images.safe_name), min_size=2, max_size=5, unique=True))
def test_the_served_output_has_a_column_per_class_whatever_the_names(classes):
    probabilities = np.random.default_rng(0).dirichlet(np.ones(len(classes)), size=3)
    table = serving.prediction_table(probabilities, classes)
    assert list(table.columns[:2]) == ["class", "probability"]
    assert len(set(table.columns)) == len(classes) + 2
    buffer = io.StringIO()
    predictions_to_json(table, buffer)  # what the scoring server answers
    rows = json.loads(buffer.getvalue())["predictions"]
    for row, expected in zip(rows, probabilities, strict=True):
        answered = [row[column] for column in serving.probability_columns(classes)]
        assert np.allclose(answered, expected) and row["class"] in classes


def test_every_figure_with_hostile_names_draws():
    classes = NASTY[:6]
    pictures = np.zeros((12, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(12) % len(classes)
    figures = [
        plots.samples_per_class(pictures, labels, classes),
        plots.confusion_matrix(np.eye(len(classes), dtype=int), classes, "t"),
        plots.labelled_grid(pictures[:2], [f"{classes[1]}→{classes[0]}"] * 2),
    ]
    for figure in figures:
        figure.canvas.draw()
        plots.close(figure)


def folder_of_classes(root: Path, names: list[str]) -> Path:
    for name in names:
        (root / name).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(root / name / "0.png")
    return root


def storable(name: str) -> bool:
    return (
        name not in (".", "..")
        and not name.startswith(".")
        and "/" not in name
        and "\0" not in name
        and len(name.encode("utf-8", "surrogateescape")) <= 200
    )


def fold(name: str) -> str:
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())


@settings(max_examples=25, deadline=None)
@given(st.lists(NAMES.filter(storable), min_size=2, max_size=4, unique_by=fold))
def test_folder_names_come_back_exactly_as_classes(tmp_path_factory, names):
    root = folder_of_classes(tmp_path_factory.mktemp("names"), names)
    assert list_folder(root).classes == [images.safe_name(n) for n in sorted(names)]


@pytest.mark.parametrize(
    "twins", [("caf\u00e9", "cafe\u0301"), ("Cat", "cat"), ("STRASSE", "straße")]
)
def test_names_equal_once_normalised_are_one_error_naming_both(tmp_path, twins):
    root = folder_of_classes(tmp_path / "data", ["other", *twins])
    with pytest.raises(UserError) as error:
        list_folder(root)
    message = str(error.value)
    assert all(ascii(name) in message for name in twins), message
    assert "\n" not in message
