"""Samplers in sigma space (the Scheduler contract): each file one algorithm."""
