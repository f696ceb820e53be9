"""asyncstore's orchestrator: the machinery built on the storage contract.

``orchestrator.runtime.open_runtime(settings)`` builds and runs everything below from one
``orchestrator.config.Settings`` (environment ``ASYNCSTORE_*`` and an optional TOML file,
read only there, feature flags included). The components: ``batching`` (BatchWriter),
``streams`` and ``broadcast`` (stream events and live delivery), ``locks`` and
``cancellation`` (session leases, cancel tokens), ``queue`` and ``outbox`` (agent tasks,
deliveries), ``webhooks``, ``maintenance`` (background sweeps), ``metrics`` (Prometheus)
and ``auth`` (password hashing off the event loop). ``orchestrator.cli`` is the
``asyncstore`` command (migrate, config, doctor, serve-metrics, demo).
"""
