"""Offline training of the learned policy: recordings, models, DAgger."""
