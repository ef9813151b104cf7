"""reliever: LLM completions for web apps on Celery workers.

Importing this package has no side effects; ``celery -A worker`` finds the Celery app in
``worker.celery``.
"""

__version__ = "0.1.0"
