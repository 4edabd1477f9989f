"""Offline pages: ``reports/index.html``, one self-contained page of the last run and of the
monitor's history (inline CSS and SVG: no script, no network)."""
