"""The DVC remote ``stack`` (the bucket's DVC_PREFIX) in the checkout's ``.dvc/config.local``:
not the default remote, and no credentials (DVC's S3 client reads the ``AWS_*`` variables of
``client_env()``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from stack.servers import venv_bin
from stack.settings import DVC_REMOTE, StackError, StackSettings


def write_remote(settings: StackSettings, repo: Path) -> bool:
    """Add or update the remote; return False when ``repo`` is no DVC repository."""
    if not (repo / ".dvc").is_dir():
        return False
    dvc = str(venv_bin() / "dvc")
    for args in (
        ["remote", "add", "--local", "--force", DVC_REMOTE, settings.dvc_remote_url],
        ["remote", "modify", "--local", DVC_REMOTE, "endpointurl", settings.s3_endpoint],
        ["remote", "modify", "--local", DVC_REMOTE, "region", settings.s3_region],
    ):
        result = subprocess.run([dvc, *args], cwd=repo, capture_output=True, text=True)
        if result.returncode:
            raise StackError(
                f"dvc: `dvc {' '.join(args)}` in {repo} failed: {result.stderr.strip()}"
            )
    return True
