"""Platforms: the real Linux machine and the simulated chip, behind one protocol."""
