"""Torch-free runtime: load a bundle, generate tokens over ONNX Runtime or TensorRT."""
