"""``make verify`` / ``make repair``: check every output ``dvc.lock`` records, in the workspace
and in the DVC cache, against its md5; ``--repair`` fixes what it can (``stages.common.integrity``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from stages.common.dvc_hashes import LOCK_FILE, lock_outputs, read_lock
from stages.common.integrity import REPAIR_HINT, RERUN, check_repo, repair


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.verify [--repo DIR] [--repair]``: check (and repair) DVC outputs."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.verify",
        description="Check every output dvc.lock records, in the workspace and in the DVC cache, "
        "against its recorded md5 (the actual bytes). --repair rewrites a corrupt "
        "cache object from a good workspace copy or removes it, restores a corrupt "
        "output file from its good cache object or removes it; then `make run` (or "
        "`make repro`) re-creates what was removed.",
    )
    parser.add_argument("--repo", default=".", help="the DVC project root")
    parser.add_argument("--repair", action="store_true", help="fix what is found (see above)")
    parser.add_argument(
        "--stage",
        action="append",
        default=None,
        help="check only this stage's outputs (repeatable)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    root = Path(args.repo)
    if not (root / LOCK_FILE).is_file():
        print(f"{root / LOCK_FILE}: not found; nothing to check", file=sys.stderr)
        return 0
    problems = check_repo(root, args.stage)
    if not problems:
        outputs = [
            path
            for path, (stage, _) in lock_outputs(read_lock(root)).items()
            if args.stage is None or stage in args.stage
        ]
        absent = [path for path in outputs if not (root / path).exists()]
        print(
            f"{len(outputs) - len(absent)} of the {len(outputs)} outputs dvc.lock records are "
            "in the workspace, each with its recorded md5 (their DVC cache objects too)"
            + (
                f"; not in the workspace: {', '.join(absent)} (`dvc pull` or {RERUN} restores them)"
                if absent
                else ""
            )
        )
        return 0
    for problem in problems:
        print(f"CORRUPT {problem.describe()}", file=sys.stderr)
    if not args.repair:
        print(
            f"{len(problems)} file(s) differ from dvc.lock. Repair: {REPAIR_HINT}", file=sys.stderr
        )
        return 1
    actions = repair(root, problems)
    for action in actions:
        print(action)
    if not any(action.startswith(("removed", "left")) for action in actions):
        print("every file repaired in place: nothing to re-run (`make verify` checks again)")
        return 0
    stages = sorted({p.stage for p in problems})
    print(
        f"now run {RERUN} (re-runs or restores {', '.join(stages)}); `dvc pull` first if "
        "the DVC remote holds good copies"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
