"""``torch.optim.Optimizer`` classes built on :mod:`whiten.linalg`."""

# the distributed package registers its stepper with the base class (base.py never imports it)
import whiten.optim.distributed  # noqa: F401
from whiten.optim.base import WhitenOptimizer, as_matrix, stat_dtype
from whiten.optim.groups import param_groups, split_parameters
from whiten.optim.kl_shampoo import KLSOAP, KLShampoo
from whiten.optim.muon import HTMuon, Muon
from whiten.optim.pro_kl_shampoo import ProKLShampoo
from whiten.optim.soap import REKLS, SOAP

__all__ = [
    "KLSOAP",
    "REKLS",
    "SOAP",
    "HTMuon",
    "KLShampoo",
    "Muon",
    "ProKLShampoo",
    "WhitenOptimizer",
    "as_matrix",
    "param_groups",
    "split_parameters",
    "stat_dtype",
]
