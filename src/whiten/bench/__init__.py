"""The ``whiten bench`` language-model pre-training comparison (SPEC §9)."""
