"""What plugin authors run on their own components: contract checks and exact reference problems.

    from latentgen.testing import check_scheduler
    check_scheduler(MySampler())         # raises AssertionError naming what is wrong

Each check takes an instance (copied, never changed) or a factory of fresh instances and returns the
names of the rules it verified; a registry-built component is also rebuilt through the registry and its
Hydra option.
"""

from latentgen.testing.analytic import GaussianMixture, empirical_order
from latentgen.testing.codec_contract import check_codec
from latentgen.testing.conditioner_contract import check_conditioner
from latentgen.testing.denoiser_contract import check_denoiser
from latentgen.testing.format_contract import check_format
from latentgen.testing.scheduler_contract import check_scheduler
from latentgen.testing.shared_rules import HYDRA_RULE, REGISTRY_RULE, STATE_DICT_RULE
from latentgen.testing.weights import fill_zero_parameters

__all__ = ["HYDRA_RULE", "REGISTRY_RULE", "STATE_DICT_RULE", "GaussianMixture", "check_codec", "check_conditioner",
           "check_denoiser", "check_format", "check_scheduler", "empirical_order", "fill_zero_parameters"]
