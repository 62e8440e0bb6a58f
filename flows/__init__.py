"""Prefect flows: one per stage (runnable alone) and one for the whole DAG. Wiring only."""
