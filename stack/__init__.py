"""The server stack (``make up``, ``make down``, ``make stack-status``): PostgreSQL, SeaweedFS
as S3, an MLflow server and a Prefect server on PostgreSQL, a process work pool with its workers.

- ``settings.py``, ``stack.env``: the one place for the settings (the pipeline reads them too).
- ``__main__.py``: ``python -m stack up|down|status``.
- ``postgres.py``, ``objectstore.py``, ``servers.py`` (MLflow, Prefect), ``pool.py`` (work pool,
  crash automation, workers), ``dvc_remote.py``: one service each.
- ``procs.py``: detached processes, pid files, stopping process trees, waiting for answers.
- ``compose.yaml``: the same services for Docker users.

It imports none of the pipeline's code (import-linter contract).
"""
