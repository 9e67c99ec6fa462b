"""Detect the machine and plan a run before loading weights: hardware, profiles, memory model, choices, peak tracker."""
