"""Serving int8 samplers: the step-level batching scheduler (``scheduler``), independent of HTTP."""
