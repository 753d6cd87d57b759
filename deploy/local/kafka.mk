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
