"""The ``whiten bench`` language-model pre-training comparison (``docs/bench.md``)."""
