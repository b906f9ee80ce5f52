"""The dry-run planner: what a training run will do, computed without loading a model."""

from loralab.plan.planner import Plan, make_plan

__all__ = ["Plan", "make_plan"]
