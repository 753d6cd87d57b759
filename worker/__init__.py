"""mmstream worker: Kafka parts in, ONNX Runtime predictions out.

This package never imports TensorFlow; the export side lives in :mod:`export`.
"""

__version__ = "0.1.0"
