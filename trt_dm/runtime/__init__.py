"""The runtime: one runner interface over torch, ONNX Runtime, OpenVINO and TensorRT, and the one function that opens a denoiser from artifacts. Imports only trt_dm.core."""
