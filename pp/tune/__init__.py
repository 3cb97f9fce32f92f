"""Automatic schedule choice: measure each layer on the device, simulate every schedule, pick the
fastest that fits the memory budget (`python -m pp.tune`, `schedule.name: auto`)."""
from pp.tune.auto import Tuning, config_yaml, default_budget, is_auto, tune, with_plan
from pp.tune.measure import LayerCost, measure_layers
from pp.tune.plan import Plan, activation_peaks, balanced_split, choose, rank_plans, ranking_table, simulate_plan

__all__ = ["LayerCost", "Plan", "Tuning", "activation_peaks", "balanced_split", "choose", "config_yaml",
           "default_budget", "is_auto", "measure_layers", "rank_plans", "ranking_table", "simulate_plan",
           "tune", "with_plan"]
