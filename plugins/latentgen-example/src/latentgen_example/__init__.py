"""latentgen-example: the classical fourth-order Runge-Kutta sampler as a latentgen plugin.

Importing this package imports nothing else: latentgen imports `latentgen_example.rk4` only when a
config asks for the scheduler `rk4` (entry point `rk4` in the group `latentgen.schedulers`).
"""

__version__ = "0.1.0"
