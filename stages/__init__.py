"""The pipeline's code. Importing it first applies `numerics` of ./params.yaml (stages/core/numerics.py):
the environment that fixes the CPU kernels and thread counts must be set before numpy or torch loads."""
from stages.core import numerics

numerics.apply_environment(numerics.mode_of("params.yaml"))
