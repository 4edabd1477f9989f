"""The one ``main()`` shape every stage shares: parse argv, load params, run, map errors.

Only this module knows about argv and exit codes; stage cores stay pure.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from stages.common.config import Params, load_params
from stages.common.errors import PipelineError

logger = logging.getLogger(__name__)


def build_parser(stage: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every stage takes (``--params``)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m stages.{stage}", description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--params", default="params.yaml", help="pipeline parameters file")
    return parser


def run_main(stage: str, parser: argparse.ArgumentParser,
             body: Callable[[argparse.Namespace, Params], None],
             argv: Sequence[str] | None = None) -> int:
    """Run a stage body; a PipelineError becomes one clear log line and exit code 1."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        body(args, load_params(args.params))
    except PipelineError as exc:
        logger.error("stage %s failed: %s", stage, exc)
        return 1
    return 0
