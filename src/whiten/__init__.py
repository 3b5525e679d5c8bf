"""whiten: matrix-whitening optimizers for LLM pre-training."""

from whiten.optim import (
    KLSOAP,
    REKLS,
    SOAP,
    HTMuon,
    KLShampoo,
    Muon,
    ProKLShampoo,
    WhitenOptimizer,
    param_groups,
    split_parameters,
)

__version__ = "0.1.0"

__all__ = [
    "KLSOAP",
    "REKLS",
    "SOAP",
    "HTMuon",
    "KLShampoo",
    "Muon",
    "ProKLShampoo",
    "WhitenOptimizer",
    "__version__",
    "param_groups",
    "split_parameters",
]
