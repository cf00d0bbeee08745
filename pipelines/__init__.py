"""Pipelines stage: tools built on top of capture and analysis (trackers, demos, sweeps, PCA layers)."""
