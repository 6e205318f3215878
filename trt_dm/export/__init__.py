"""Export: ONNX with Q/DQ and its checks (onnx), the shared Q/DQ pipeline (qdq), the job and file names (job),
ONNX Runtime's int8 layout (ort_int8)."""
