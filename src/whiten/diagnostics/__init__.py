"""Diagnostics: eigenbasis rotation around a gradient spike, Kronecker-factor spectra, weight-ESD alpha.

Each instrument has a small Python API (usable inside a training loop) and a ``whiten diagnose``
sub-command on top; see ``docs/diagnostics/``.
"""

from whiten.diagnostics.alpha import (
    LayerAlpha,
    PowerLawFit,
    fit_power_law,
    format_alpha_table,
    matrix_alpha,
    mean_by_type,
    weight_alpha,
)
from whiten.diagnostics.angles import largest_angle_deg, subspace_angles
from whiten.diagnostics.spectra import FactorSpectrum, factor_spectra, format_spectra_table, record_spectra
from whiten.diagnostics.spike import SpikeConfig, SpikeResult, format_spike_tables, run_spike_experiment

__all__ = [
    "FactorSpectrum",
    "LayerAlpha",
    "PowerLawFit",
    "SpikeConfig",
    "SpikeResult",
    "factor_spectra",
    "fit_power_law",
    "format_alpha_table",
    "format_spectra_table",
    "format_spike_tables",
    "largest_angle_deg",
    "matrix_alpha",
    "mean_by_type",
    "record_spectra",
    "run_spike_experiment",
    "subspace_angles",
    "weight_alpha",
]
