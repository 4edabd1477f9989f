"""``make plots`` (flows/plots.py): the DVC plots page loads nothing from the network.

A temporary DVC repo holds the project's own ``plots:`` section of dvc.yaml and the evaluate
stage's real plot files (``write_plots``) for a model fitted on sklearn's wine table, plus a
training history. Checked statically: no script, stylesheet or image from an http(s) URL, the
vega libraries inline, four vega-embed plots, the confusion matrix oriented as the PNG (rows
actual, columns predicted) and the training curves' y axis named. The browser test under
tests/browser/ draws the page.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows import plots

ROOT = Path(__file__).resolve().parents[2]
LOADED = re.compile(r"""<(?:script|link|img)\b[^>]*?\b(?:src|href)=["']([^"']+)["']""", re.I)
INLINE_SCRIPT = re.compile(r"<script>.*?</script>", re.S)
SPEC = re.compile(r"^\s*var spec = (\{.*\});?\s*$", re.M)


def channels(spec: Any, name: str) -> list[dict[str, Any]]:
    """Every ``encoding.<name>`` channel of a spec, wherever the template nests it (layers)."""
    if isinstance(spec, list):
        return [found for item in spec for found in channels(item, name)]
    if not isinstance(spec, dict):
        return []
    own = [spec["encoding"][name]] if name in spec.get("encoding", {}) else []
    return own + [found for key, value in spec.items() for found in channels(value, name)]


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sklearn.datasets import load_wine
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from stages.evaluate.stage import write_plots

    repo = tmp_path_factory.mktemp("plots-repo")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=repo, check=True)
    section = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": section}, sort_keys=False))
    x, y = load_wine(return_X_y=True)
    model = make_pipeline(StandardScaler(), LogisticRegression()).fit(x[::2], y[::2])
    proba = model.predict_proba(x[1::2])
    write_plots(repo / "reports/eval", y[1::2], proba, [0, 1, 2], {"roc_auc_micro": 0.99})
    (repo / "reports/train").mkdir(parents=True)
    (repo / "reports/train/history.csv").write_text(
        "epoch,train_loss,val_loss\n1,0.9,0.95\n2,0.5,0.6\n3,0.3,0.45\n"
    )

    assert plots.main(["--repo", str(repo)]) == 0
    return repo / "reports/plots/index.html"


def test_the_plots_page_loads_nothing_from_the_network(page: Path) -> None:
    html = page.read_text(encoding="utf-8")
    loaded = LOADED.findall(INLINE_SCRIPT.sub("", html))  # not the tags the bundle's code makes
    assert len(loaded) == 3  # the three PNGs, copied beside the page
    for url in loaded:
        assert not re.match(r"(?:https?:)?//", url), url
        assert (page.parent / url).is_file(), url
    assert "window.vegaEmbed=" in html and html.count("vegaEmbed('#") == 4


def test_confusion_matrix_is_oriented_as_the_png_and_the_loss_axis_named(page: Path) -> None:
    specs = {
        json.loads(found).get("title", {}).get("text", ""): json.loads(found)
        for found in SPEC.findall(page.read_text(encoding="utf-8"))
    }
    confusion = specs["Confusion matrix (test split)"]
    assert {x.get("field") for x in channels(confusion, "x")} == {"predicted"}
    assert {y.get("field") for y in channels(confusion, "y")} == {"actual"}
    curves = specs["Training curves (loss per epoch)"]
    assert {y.get("title") for y in channels(curves, "y")} == {"loss"}
