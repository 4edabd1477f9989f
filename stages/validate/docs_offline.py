"""Make GX's Data Docs render with no network: vendor their assets and point the pages at them.

GX 1.x writes pages that load Bootstrap, jQuery, Popper, Font Awesome, bootstrap-table (+ its
filter-control and datepicker), bootstrap-dark and vega from CDNs, and its logo from S3. Offline
that leaves no pass/fail icons and an empty index table. :func:`make_docs_offline` copies the
assets from pinned PyPI packages into ``<docs>/static/vendor/`` and rewrites every page's tags to
relative paths (GX writes pages at several depths, and gets the favicon's depth wrong on
validation pages); what has no package is dropped:

* bootstrap-table (no PyPI package): ``docs_table.js`` here, a small jQuery plugin of ours,
  draws GX's index table from the same options (columns, rows, sort order, clickable rows);
  its filter controls and datepicker are left out.
* bootstrap-dark (a prefers-dark theme) and Popper (Bootstrap's bundle carries it).
* vega, vega-lite and vega-embed on a page that draws no chart (GX includes them on every
  page); a page with a chart gets one bundle of the three (``vl-convert-python``).

Idempotent (a rewritten page has nothing left to rewrite); run after every GX docs build.
``python -m stages.validate.docs_offline <docs dir>`` does it to an existing folder.
"""

from __future__ import annotations

import argparse
import functools
import logging
import re
import shutil
from importlib import resources
from pathlib import Path

from stages.common.io import write_text

logger = logging.getLogger(__name__)

VENDOR = Path("static") / "vendor"
# CDN URL (a substring of it) -> the vendored file that replaces it; None: drop the tag
REPLACEMENTS: dict[str, str | None] = {
    "bootstrap/4.3.1/css/bootstrap.min.css": "bootstrap/css/bootstrap.min.css",
    "bootstrap/4.3.1/js/bootstrap.min.js": "bootstrap/js/bootstrap.bundle.min.js",
    "popper.js": None,  # inside bootstrap.bundle
    "jquery-3.7.1.min.js": "jquery/jquery.min.js",
    "font-awesome/6.6.0/css/all.min.css": "font-awesome/css/all.min.css",
    "npm/vega@5": "vega/vega-embed-bundle.js",  # vega, vega-lite and vega-embed: VEGA
    "npm/vega-lite@5": None,
    "npm/vega-embed@6": None,
    "bootstrap-table@1.19.1/dist/bootstrap-table.min.js": "docs_table.js",
    "bootstrap-table@1.19.1/dist/bootstrap-table.min.css": None,
    "filter-control": None,
    "bootstrap-datepicker": None,
    "bootstrap-dark": None,
}
VEGA = REPLACEMENTS["npm/vega@5"] or ""
GX_ASSETS = "https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/"
TAG = re.compile(
    r"""<(script|link)\b[^>]*?\b(?:src|href)=["'](https?://[^"']+)["'][^>]*>(?:\s*</script>)?""",
    re.IGNORECASE,
)


def vendor_assets(vendor: Path) -> None:
    """Copy the pinned packages' files into ``vendor`` (skipping what is already there)."""
    xstatic = resources.files("xstatic.pkg")
    copies = {
        "bootstrap/css/bootstrap.min.css": xstatic / "bootstrap/data/css/bootstrap.min.css",
        "bootstrap/js/bootstrap.bundle.min.js": xstatic
        / "bootstrap/data/js/bootstrap.bundle.min.js",
        "jquery/jquery.min.js": xstatic / "jquery/data/jquery.min.js",
        "font-awesome/css/all.min.css": xstatic / "font_awesome/data/css/all.min.css",
        "docs_table.js": resources.files(__package__) / "docs_table.js",
    }
    for name, source in copies.items():
        target = vendor / name
        if not target.exists() or name == "docs_table.js":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    fonts = vendor / "font-awesome/webfonts"  # all.min.css loads ../webfonts/*
    if not fonts.exists():
        with resources.as_file(xstatic / "font_awesome/data/webfonts") as found:
            shutil.copytree(found, fonts)


@functools.cache
def _vega_bundle() -> str:
    import vl_convert

    # one classic script setting window.vega, vegaLite and vegaEmbed (~1 MB, ~1.5 s to bundle)
    return vl_convert.javascript_bundle()


def vendor_vega(vendor: Path) -> None:
    """The vega libraries, for pages that draw a chart (few do: the bundle is made on demand)."""
    bundle = vendor / VEGA
    if not bundle.exists():
        bundle.parent.mkdir(parents=True, exist_ok=True)
        write_text(bundle, _vega_bundle())


def offline_html(html: str, static: str) -> str:
    """``html`` with every CDN tag pointed at ``static`` + vendor path (or dropped).

    The vega scripts are kept (pointed at the vendored bundle) only on a page that calls
    ``vegaEmbed``: GX includes them on every page, charts or not.
    """
    charts = "vegaEmbed(" in html

    def replace(match: re.Match[str]) -> str:
        kind, url = match.group(1).lower(), match.group(2)
        local = next((local for key, local in REPLACEMENTS.items() if key in url), "?")
        if local == "?":
            logger.warning("Data Docs: dropped %s with no offline copy", url)
            return ""
        if local is None or (local == VEGA and not charts):
            return ""
        path = f"{static}vendor/{local}"
        if kind == "script":
            return f'<script src="{path}"></script>'
        return f'<link rel="stylesheet" href="{path}">'

    html = TAG.sub(replace, html)
    # GX's logo (an <img>, and a CSS background in dark mode) from S3: its own copy in static/
    html = re.sub(
        re.escape(GX_ASSETS) + r"[A-Za-z_-]+\.png(\?[^\"')]*)?",
        f"{static}images/logo-long.png",
        html,
    )
    # GX's own relative links into static/ miss a level on validation pages (the favicon)
    return re.sub(
        r"""((?:src|href)=["'])(?:\./|(?:\.\./)+)static/""", lambda m: m.group(1) + static, html
    )


def make_docs_offline(docs_dir: Path) -> int:
    """Vendor the assets into ``docs_dir`` and rewrite its pages; the number of pages changed."""
    docs_dir = Path(docs_dir)
    vendor_assets(docs_dir / VENDOR)
    changed = 0
    for page in sorted(docs_dir.rglob("*.html")):
        depth = len(page.relative_to(docs_dir).parts) - 1
        static = "../" * depth + "static/" if depth else "./static/"
        html = page.read_text(encoding="utf-8")
        offline = offline_html(html, static)
        if VEGA in offline:
            vendor_vega(docs_dir / VENDOR)
        if offline != html:
            write_text(page, offline)
            changed += 1
    return changed


def main(argv: list[str] | None = None) -> int:
    """``python -m stages.validate.docs_offline DOCS_DIR``: make an existing folder offline."""
    parser = argparse.ArgumentParser(
        prog="python -m stages.validate.docs_offline", description=main.__doc__
    )
    parser.add_argument("docs_dir", type=Path, help="a GX Data Docs folder (with index.html)")
    args = parser.parse_args(argv)
    if not (args.docs_dir / "index.html").is_file():
        parser.error(f"{args.docs_dir}: no index.html, not a Data Docs folder")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.info("%d page(s) rewritten in %s", make_docs_offline(args.docs_dir), args.docs_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
