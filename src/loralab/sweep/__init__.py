"""Sweeps: many training runs from one baseline, evaluated the same way, scored and reported."""
