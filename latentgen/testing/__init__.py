"""What plugin authors run on their own components: contract checks and exact reference problems.

    from latentgen.testing import check_scheduler
    check_scheduler(MySampler())         # raises AssertionError naming what is wrong
"""

from latentgen.testing.analytic import GaussianMixture, empirical_order
from latentgen.testing.scheduler_contract import check_scheduler
from latentgen.testing.weights import fill_zero_parameters

__all__ = ["GaussianMixture", "check_scheduler", "empirical_order", "fill_zero_parameters"]
