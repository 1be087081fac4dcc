"""The SR3 pipelines."""

from .base import SR3BasePipeline, SR3PipelineOutput, register_remote_code_modules
from .pipeline_sr3 import SR3Pipeline
from .pipeline_sr3_cascade import SR3CascadePipeline, SR3CascadePipelineOutput
from .pipeline_sr3_unconditional import SR3UnconditionalPipeline

__all__ = [
    "SR3BasePipeline",
    "SR3CascadePipeline",
    "SR3CascadePipelineOutput",
    "SR3Pipeline",
    "SR3PipelineOutput",
    "SR3UnconditionalPipeline",
]

# Here, where every SR3 pipeline class is first imported however it is reached (`diffusers_sr3.SR3Pipeline`, a
# folder's `pipeline_sr3.py`, this package), so the aliases are in place before Diffusers checks a passed component.
register_remote_code_modules()
