"""Timestep-stratified calibration (PTQ4DM): calibration sets, statistics, range recipes."""
