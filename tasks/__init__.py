"""Stage logic: pure functions that do the work, plus thin Prefect ``@task`` wrappers."""
