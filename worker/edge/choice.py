"""The client choice: ``--kafka-client`` -> its :class:`~worker.edge.client.Clients`.

The only module that names both implementations; each is imported once chosen, so
either loads without the other's library installed.
"""

from __future__ import annotations

from worker.contract.errors import ConfigError
from worker.edge.client import Clients


def clients_for(kafka_client: str) -> Clients:
    """The :class:`Clients` of ``--kafka-client``.

    Raises:
        ConfigError: an unknown client, or one whose library is not installed.
    """
    if kafka_client == "kafka-python":
        try:
            from worker.edge.kafka_python import KafkaPythonClients
        except ImportError as exc:
            raise ConfigError(
                f"--kafka-client kafka-python: kafka-python is not installed: {exc}"
            ) from exc
        return KafkaPythonClients()
    if kafka_client == "confluent":
        try:
            from worker.edge.confluent import ConfluentClients
        except ImportError as exc:
            raise ConfigError(
                "--kafka-client confluent: confluent-kafka is not installed "
                f"(pip install 'mmstream[confluent]'): {exc}"
            ) from exc
        return ConfluentClients()
    raise ConfigError(f"--kafka-client must be kafka-python or confluent, not {kafka_client!r}")
