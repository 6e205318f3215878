"""Serving int8 samplers, split like an inference server: the step-level batching scheduler (``scheduler``: plain
data, no threads), the service engine (``engine``: its thread, backpressure, warm-up, metrics), the HTTP front
(``http``: FastAPI, translating HTTP to engine calls) and Ray Serve replicas of the same (``ray_app``)."""
