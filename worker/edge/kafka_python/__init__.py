"""The kafka-python client (the default): :mod:`.clients` implements the edge's
interfaces, :mod:`.build` makes kafka-python's clients with mmstream's settings,
:mod:`.security` words its failures and checks ACLs, :mod:`.records` converts its
records, :mod:`.admin` administers topics for tools and tests."""

from worker.edge.kafka_python.clients import KafkaPythonClients

__all__ = ["KafkaPythonClients"]
