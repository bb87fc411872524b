"""Gaussian splatting (built in a later issue)."""
