"""asyncstore's orchestrator: the machinery built on the storage contract.

For now it holds configuration (``orchestrator.config``), the ``asyncstore`` command line
(``orchestrator.cli``) and the end-to-end storage demo (``orchestrator.demo``). Batching,
streams, broadcast, locks, cancellation, queue, outbox and webhooks arrive with their issues.
"""
