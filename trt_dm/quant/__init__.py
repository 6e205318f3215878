"""Quantization: the config, modelopt fake-quant modules, calibration (statistics once, ranges per recipe), fake-quant models, one-graph, sensitivity."""
