"""``dvc repro`` then ``dvc push``, holding the workspace's run lock (``make repro`` runs it).

Before ``dvc repro`` (without extra DVC arguments), the MLflow tracking store is checked
(``tracking.check_tracking_store``): a server that is down stops the run before any stage.
Before ``dvc push``, the DVC cache objects about to be pushed are checked against their names
(``integrity.check_before_push``): a corrupt one stops the push, named, with the repair.

The same lock as the Prefect flow (``stages.common.runlock``): while a run holds the workspace,
this one refuses at once, naming the holder's pid, command and start (``--wait``: waits for it
up to ``--wait-timeout`` seconds). Usage, from the project root::

    python -m flows.repro [--repo .] [--wait] [--wait-timeout 3600] [--no-push] [-- DVC-ARGS]

Extra arguments after ``--`` go to ``dvc repro`` (e.g. ``-- --force train``).
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from stages.common import integrity, runlock
from stages.common.config import load_params
from stages.common.errors import PipelineError
from stages.common.tracking import check_tracking_store

logger = logging.getLogger("flows.repro")


def run_dvc(args: Sequence[str], repo: Path) -> int:
    """Run ``dvc <args>`` in ``repo`` (output straight through); it shares the workers lock."""
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=repo,
        check=False,
        pass_fds=runlock.inherited_fds(),
    ).returncode


def check_mlflow(repo: Path) -> None:
    """Refuse before any stage when the MLflow tracking store cannot be used (one line)."""
    try:
        params = load_params(repo / "params.yaml")
    except PipelineError:
        return  # a missing or bad params.yaml: the stages say so, naming the field
    check_tracking_store(params.mlflow, repo)


def main(argv: Sequence[str] | None = None) -> int:
    """Reproduce the pipeline with DVC under the run lock; the exit code of the failing step."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.repro",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--repo", default=".", help="project checkout holding dvc.yaml")
    runlock.add_wait_arguments(parser)
    parser.add_argument("--no-push", action="store_true", help="skip `dvc push`")
    parser.add_argument("dvc_args", nargs="*", help="extra `dvc repro` arguments (after --)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    repo = Path(args.repo).resolve()
    try:
        with runlock.run_lock(repo, wait_s=args.wait_timeout if args.wait else 0.0):
            if not args.dvc_args:  # the whole pipeline: train and register need MLflow
                check_mlflow(repo)
            code = run_dvc(["repro", *args.dvc_args], repo)
            if code == 0 and not args.no_push:
                integrity.check_before_push(repo)  # never upload a corrupt cache object
                code = run_dvc(["push"], repo)
    except PipelineError as exc:  # another run holds the workspace; MLflow down; corrupt cache
        logger.error("%s", exc)
        return 1
    return code


if __name__ == "__main__":
    raise SystemExit(main())
