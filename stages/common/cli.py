"""The one ``main()`` shape every stage shares: parse argv, load params, run, map errors.

Only this module knows about argv and exit codes; stage cores stay pure.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from stages.common import faults, integrity, params_snapshot, parent_watch, runlock
from stages.common.config import Params
from stages.common.errors import PipelineError

logger = logging.getLogger(__name__)


def build_parser(stage: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every stage takes (``--params``)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m stages.{stage}",
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--params", default="params.yaml", help="pipeline parameters file")
    return parser


def run_main(
    stage: str,
    parser: argparse.ArgumentParser,
    body: Callable[[argparse.Namespace, Params], None],
    argv: Sequence[str] | None = None,
) -> int:
    """Run a stage body; a PipelineError or a known fault becomes one clear log line, exit 1.

    Around the body: the stage dies with its parent (``dvc repro`` or the flow), removes the
    temp folders a killed run left, reads params once and refuses to finish if the file changed
    under it, and checks the inputs it reads against the hashes ``dvc.lock`` holds. The first
    two only in a stage process (started by DVC or as ``python -m stages.X``), not when a test
    or tool calls ``main()`` in its own process and folder.
    """
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if parent_watch.is_stage_process():
            parent_watch.die_with_parent()
            runlock.remove_stale_temp_dirs(stage)
        snapshot = params_snapshot.ParamsSnapshot.take(args.params)
        params = snapshot.load()  # parsed from the bytes the check compares with
        integrity.verify_stage_inputs(stage)
        body(args, params)
        snapshot.check_unchanged(stage)
    except PipelineError as exc:
        logger.error("stage %s failed: %s", stage, exc)
        return 1
    except Exception as exc:
        described = faults.describe_fault(exc)  # a store down, a disk full: one line, no retry
        if described is None:
            raise
        logger.error("stage %s failed: %s", stage, described)
        return 1
    finally:
        params_snapshot.reset()  # a later main() in this process takes its own
    return 0
