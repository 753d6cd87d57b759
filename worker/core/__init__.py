"""The streaming core: decode, assemble, batch, and the loop with its parts.

The parts: checkpointing, backpressure, dead letters, the poison budget, sources,
the event filter and admission.
"""
