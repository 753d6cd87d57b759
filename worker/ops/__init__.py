"""Operations: probes and metrics over HTTP, logging, the ``--processes`` launcher."""
