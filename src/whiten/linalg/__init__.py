"""Pure tensor kernels (no optimizer state): Newton–Schulz, spectral maps, eigen/QR, precision."""

from whiten.linalg.batching import map_batched
from whiten.linalg.eigen import (
    eigh_descending,
    orthogonal_iteration,
    principal_angles,
    rayleigh_quotients,
    sort_basis,
)
from whiten.linalg.kl_family import (
    effective_flat_value,
    ema_eigenvalues,
    kl_tensor_statistics,
    rotate,
    rotate_all,
    spike_flat_statistics,
)
from whiten.linalg.kronecker import clamp_eigenvalues, kl_eigenvalue_targets, kl_factor_targets
from whiten.linalg.newton_schulz import (
    KELLER_QUINTIC,
    NS_COEFFICIENT_SETS,
    NS_METHODS,
    POLAR_EXPRESS,
    NSSchedule,
    newton_schulz,
    newton_schulz_left_factor,
    ns_schedule,
    polar_svd,
    prefers_gram,
)
from whiten.linalg.precision import (
    MANTISSA_BITS,
    PRECISIONS,
    check_precision,
    emulate_global_matmul_precision,
    emulate_matmul_precision,
    matmul_precision,
    round_mantissa,
)
from whiten.linalg.spectral import (
    coupled_newton_schulz_sqrt,
    initial_stream_basis,
    ns_power_rounds,
    schatten_power_ns,
    schatten_power_stream,
    schatten_power_svd,
)

__all__ = [
    "KELLER_QUINTIC",
    "MANTISSA_BITS",
    "NS_COEFFICIENT_SETS",
    "NS_METHODS",
    "POLAR_EXPRESS",
    "PRECISIONS",
    "NSSchedule",
    "check_precision",
    "clamp_eigenvalues",
    "coupled_newton_schulz_sqrt",
    "effective_flat_value",
    "eigh_descending",
    "ema_eigenvalues",
    "emulate_global_matmul_precision",
    "emulate_matmul_precision",
    "initial_stream_basis",
    "kl_eigenvalue_targets",
    "kl_factor_targets",
    "kl_tensor_statistics",
    "map_batched",
    "matmul_precision",
    "newton_schulz",
    "newton_schulz_left_factor",
    "ns_power_rounds",
    "ns_schedule",
    "orthogonal_iteration",
    "polar_svd",
    "prefers_gram",
    "principal_angles",
    "rayleigh_quotients",
    "rotate",
    "rotate_all",
    "round_mantissa",
    "schatten_power_ns",
    "schatten_power_stream",
    "schatten_power_svd",
    "sort_basis",
    "spike_flat_statistics",
]
