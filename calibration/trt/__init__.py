"""``llama-export trt``: strongly typed TensorRT engines from a bundle's ONNX variants.

Pure planning (profiles, trtexec lines, memory, graph checks, version rules) runs anywhere;
only :mod:`.build` and :mod:`.gpu` touch TensorRT / CUDA.
"""
