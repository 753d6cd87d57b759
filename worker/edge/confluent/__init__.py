"""The librdkafka client (``--kafka-client confluent``, the extra ``mmstream[confluent]``):
:mod:`.clients` is the factory; :mod:`.settings`, :mod:`.errors`, :mod:`.consumer`,
:mod:`.producer` and :mod:`.readers` implement the edge's interfaces, :mod:`.access` its
ACL check."""

from worker.edge.confluent.clients import ConfluentClients

__all__ = ["ConfluentClients"]
