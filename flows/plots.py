"""``make plots``: the DVC plots (``dvc.yaml`` ``plots:``) as one HTML page that renders offline.

``dvc plots show`` writes a page that loads vega, vega-lite and vega-embed from a CDN, so with
no network the four charts are blank. This runs it with an HTML template of ours
(``--html-template``) that carries those three libraries inline, bundled by the pinned
``vl-convert-python``; the PNGs DVC copies beside the page. Usage, from the project root::

    python -m flows.plots [--repo .] [--out reports/plots]

writes ``<out>/index.html``; the exit code is dvc's.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger("flows.plots")

PAGE = """<!DOCTYPE html>
<html>
<head>
  <meta charset="utf-8">
  {refresh_tag}
  <title>DVC plots</title>
  <script>/* vega, vega-lite and vega-embed (vl-convert-python) */
VEGA</script>
  <style>
    body { font-family: sans-serif; margin: 1em; }
    table { border-spacing: 15px; }
  </style>
</head>
<body>
  {plot_divs}
</body>
</html>
"""


def offline_template() -> str:
    """The HTML template for ``dvc plots show --html-template``, the vega libraries inline."""
    import vl_convert

    # one classic script setting window.vega, window.vegaLite and window.vegaEmbed, which is
    # what dvc's plot divs call; "</script" inside it would end the inline script early
    # (the newest vega-lite: it reads dvc's v5 specs, with a console warning per plot)
    bundle = vl_convert.javascript_bundle().replace("</script", "<\\/script")
    return PAGE.replace("VEGA", bundle)


def show_plots(repo: Path, out: Path) -> int:
    """Run ``dvc plots show`` in ``repo`` with the offline template, writing ``out``."""
    with tempfile.TemporaryDirectory(prefix="plots-template-") as tmp:
        template = Path(tmp) / "offline.html"
        template.write_text(offline_template(), encoding="utf-8")
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "dvc",
                "plots",
                "show",
                "--html-template",
                str(template),
                "-o",
                str(out),
            ],
            cwd=repo,
            check=False,
        ).returncode


def main(argv: Sequence[str] | None = None) -> int:
    """Write the DVC plots page; dvc's exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.plots",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--repo", default=".", help="project checkout holding dvc.yaml")
    parser.add_argument("--out", default="reports/plots", help="folder for index.html")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    repo = Path(args.repo).resolve()
    code = show_plots(repo, Path(args.out))
    if code == 0:
        logger.info("plots: %s (renders offline)", (repo / args.out / "index.html"))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
