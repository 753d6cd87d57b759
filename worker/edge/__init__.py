"""The Kafka edge: the interface the core is given (:mod:`.client`), what both clients
share (:mod:`.common`), the client choice (:mod:`.choice`) and one subpackage per client
(:mod:`.kafka_python`, the default, and :mod:`.confluent`)."""
