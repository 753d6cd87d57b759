# Local Kafka broker from jars (deploy/local/kafka.sh): `make kafka`, `make kafka-stop`.
# Included by the top-level Makefile. Override, e.g.: make kafka KAFKA_PORT=29092 KAFKA_CONTROLLER_PORT=29093
KAFKA_MK_DIR := $(dir $(abspath $(lastword $(MAKEFILE_LIST))))
KAFKA_SH := $(KAFKA_MK_DIR)kafka.sh
KAFKA_PORT ?= 9092
KAFKA_CONTROLLER_PORT ?= 9093
# Kafka's own default: members of a new group that join within 3 s share the first assignment.
KAFKA_INITIAL_REBALANCE_DELAY_MS ?= 3000
KAFKA_DATA_DIR ?= $(abspath $(KAFKA_MK_DIR)../../.cache/kafka)

.PHONY: kafka kafka-stop
kafka:
	bash $(KAFKA_SH) start --port $(KAFKA_PORT) --controller-port $(KAFKA_CONTROLLER_PORT) \
		--data-dir $(KAFKA_DATA_DIR) --initial-rebalance-delay-ms $(KAFKA_INITIAL_REBALANCE_DELAY_MS)

kafka-stop:
	bash $(KAFKA_SH) stop --data-dir $(KAFKA_DATA_DIR)

# Three-broker cluster on loopback (deploy/local/kafka-cluster.sh): `make kafka-cluster`,
# `make kafka-cluster-stop`. Ports are chosen free on the first start and kept in
# $(KAFKA_CLUSTER_DATA_DIR)/ports; `bash deploy/local/kafka-cluster.sh bootstrap --data-dir ...`
# prints the bootstrap string.
KAFKA_CLUSTER_SH := $(KAFKA_MK_DIR)kafka-cluster.sh
KAFKA_CLUSTER_DATA_DIR ?= $(abspath $(KAFKA_MK_DIR)../../.cache/kafka-cluster)

.PHONY: kafka-cluster kafka-cluster-stop
kafka-cluster:
	bash $(KAFKA_CLUSTER_SH) start --data-dir $(KAFKA_CLUSTER_DATA_DIR) \
		--initial-rebalance-delay-ms $(KAFKA_INITIAL_REBALANCE_DELAY_MS)

kafka-cluster-stop:
	bash $(KAFKA_CLUSTER_SH) stop --data-dir $(KAFKA_CLUSTER_DATA_DIR)

# Secured single node (deploy/local/kafka-secure.sh): SASL_SSL (SCRAM-SHA-512) on
# KAFKA_SECURE_PORT, mTLS on KAFKA_SECURE_MTLS_PORT, ACLs enforced: `make kafka-secure`,
# `make kafka-secure-stop`; `bash deploy/local/kafka-secure.sh env` prints ports and files.
KAFKA_SECURE_SH := $(KAFKA_MK_DIR)kafka-secure.sh
KAFKA_SECURE_PORT ?= 9192
KAFKA_SECURE_MTLS_PORT ?= 9193
KAFKA_SECURE_CONTROLLER_PORT ?= 9194
KAFKA_SECURE_DATA_DIR ?= $(abspath $(KAFKA_MK_DIR)../../.cache/kafka-secure)

.PHONY: kafka-secure kafka-secure-stop
kafka-secure:
	bash $(KAFKA_SECURE_SH) start --data-dir $(KAFKA_SECURE_DATA_DIR) --port $(KAFKA_SECURE_PORT) \
		--mtls-port $(KAFKA_SECURE_MTLS_PORT) --controller-port $(KAFKA_SECURE_CONTROLLER_PORT) \
		--initial-rebalance-delay-ms $(KAFKA_INITIAL_REBALANCE_DELAY_MS)

kafka-secure-stop:
	bash $(KAFKA_SECURE_SH) stop --data-dir $(KAFKA_SECURE_DATA_DIR)
