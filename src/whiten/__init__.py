"""whiten: matrix-whitening optimizers for LLM pre-training."""

from whiten import optim as _optim
from whiten.optim import *  # noqa: F403 - the public names are whiten.optim.__all__

__version__ = "0.1.0"

__all__ = [*_optim.__all__, "__version__"]
