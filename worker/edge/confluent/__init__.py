"""The librdkafka client (``--kafka-client confluent``, the extra ``mmstream[confluent]``):
:mod:`.clients` implements the edge's interfaces, :mod:`.access` its ACL check."""

from worker.edge.confluent.clients import ConfluentClients

__all__ = ["ConfluentClients"]
