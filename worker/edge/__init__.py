"""The Kafka edge: the client interface the core is given, and its kafka-python implementation."""
