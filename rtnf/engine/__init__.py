"""Engines: the hot calls as graphs, ONNX export, backends (torch, ONNX Runtime, TensorRT)."""
