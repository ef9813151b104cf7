"""Thin Celery task modules: parse the job, call the engine in ``worker``, report."""
