"""``torch.optim.Optimizer`` classes built on :mod:`whiten.linalg`."""

from whiten.optim.base import WhitenOptimizer, as_matrix, stat_dtype
from whiten.optim.groups import param_groups, split_parameters
from whiten.optim.muon import HTMuon, Muon

__all__ = ["HTMuon", "Muon", "WhitenOptimizer", "as_matrix", "param_groups", "split_parameters", "stat_dtype"]
