"""Prefect tasks: the stages of `farense.stages` with content-keyed caching, retries and UI artifacts."""
