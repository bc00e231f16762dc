"""grouter: preemptive routing for Mixture-of-Experts training.

A small router network is distilled from a trained MoE, frozen, and used as the fixed router of
a new model, so routing can be computed before training, stored with the data, and used to plan
expert parallelism. See README.md for the pipeline and ../SPEC for the method.
"""

from .errors import GrouterError
from .model import MoEConfig, MoELM, MoEOutput
from .network import Grouter, GrouterConfig
from .routers import Routing, topk_gating

__all__ = ["Grouter", "GrouterConfig", "GrouterError", "MoEConfig", "MoELM", "MoEOutput", "Routing", "topk_gating"]
__version__ = "0.1.0"
