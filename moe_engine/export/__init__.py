"""ONNX export of MoE checkpoints (and of their quantized versions), checked on onnxruntime; ``me.export_onnx``."""
