"""``python -m serving serve --help``."""

from serving.cli import main

raise SystemExit(main())
