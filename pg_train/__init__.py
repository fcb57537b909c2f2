"""The grounded model and everything that runs one: training, evaluation, benchmarks, probes."""

from pg_analysis.errors import adopt

from .grounding import GroundingError

adopt(GroundingError)  # the model core's errors are bad input at every CLI
