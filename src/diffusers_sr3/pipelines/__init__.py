"""The SR3 pipelines."""

from .base import SR3BasePipeline, SR3PipelineOutput
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
