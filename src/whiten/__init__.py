"""whiten: matrix-whitening optimizers for LLM pre-training."""

from whiten.optim import HTMuon, Muon, WhitenOptimizer, param_groups, split_parameters

__version__ = "0.1.0"

__all__ = ["HTMuon", "Muon", "WhitenOptimizer", "__version__", "param_groups", "split_parameters"]
