"""Evaluation: reference data, feature metrics (FD, KID, PSNR), the classifier, evaluation runs, profiling."""
