import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # small problems: one thread avoids oversubscription on the 2-core CI machine and keeps results stable
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def random_with_singular_values(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """An m x n float64 matrix with the given singular values (len(s) = min(m, n))."""
    gen = torch.Generator().manual_seed(seed)
    A, _ = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64, generator=gen))
    B, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    k = min(m, n)
    return (A[:, :k] * s.to(torch.float64)) @ B[:, :k].T
