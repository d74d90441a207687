"""Heterogeneity-adaptive sequence parallelism (FlexSP): cost model, planner, executor, profiling."""

from trainers.parallel.adaptive.cost import BUILTIN, CostModel, load_cost_model
from trainers.parallel.adaptive.planner import (Group, InfeasibleError, MicroBatch, SPPlan, best_homogeneous,
                                                lower_bound_s, plan_adaptive, plan_homogeneous, static_degree)

__all__ = ["BUILTIN", "CostModel", "Group", "InfeasibleError", "MicroBatch", "SPPlan", "best_homogeneous",
           "load_cost_model", "lower_bound_s", "plan_adaptive", "plan_homogeneous", "static_degree"]
