"""Prefect flows: compositions of the stage tasks, nothing else."""
