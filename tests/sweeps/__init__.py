"""The model-library sweeps: every model of a library, built normally and through every meta flow."""
