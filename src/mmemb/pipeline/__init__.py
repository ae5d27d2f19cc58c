"""The method end to end: stages that read and write files in one run folder."""

from .config import PipelineConfig, load_pipeline_config
from .run import run_pipeline

__all__ = ["PipelineConfig", "load_pipeline_config", "run_pipeline"]
