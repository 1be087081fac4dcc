"""diffusers-sr3: SR3 (Image Super-Resolution via Iterative Refinement) for Hugging Face Diffusers.

The public names are imported on first use (PEP 562), so `import diffusers_sr3` and the `sr3` command line's
`--help` and argument errors start without torch and Diffusers, which take seconds to import.
"""

import importlib
import types
from typing import TYPE_CHECKING, Any, List

__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_LAZY_NAMES = {
    "CheckpointError": "convert",
    "convert_original_checkpoint": "convert",
    "degrade": "image_processing",
    "images_to_tensor": "image_processing",
    "upsample_condition": "image_processing",
    "SR3UNet2DModel": "models",
    "SR3UNet2DOutput": "models",
    "make_beta_schedule": "noise",
    "make_scheduler": "noise",
    "noise_level_for_step": "noise",
    "sample_training_noise_levels": "noise",
    "swap_scheduler": "noise",
    "SR3BasePipeline": "pipelines",
    "SR3CascadePipeline": "pipelines",
    "SR3CascadePipelineOutput": "pipelines",
    "SR3Pipeline": "pipelines",
    "SR3PipelineOutput": "pipelines",
    "SR3UnconditionalPipeline": "pipelines",
    "finish_interrupted_save": "pipelines.base",
    "register_remote_code_modules": "pipelines.base",
}

__all__ = [
    "CheckpointError",
    "SR3BasePipeline",
    "SR3CascadePipeline",
    "SR3CascadePipelineOutput",
    "SR3Pipeline",
    "SR3PipelineOutput",
    "SR3UNet2DModel",
    "SR3UNet2DOutput",
    "SR3UnconditionalPipeline",
    "convert_original_checkpoint",
    "degrade",
    "finish_interrupted_save",
    "images_to_tensor",
    "make_beta_schedule",
    "make_scheduler",
    "noise_level_for_step",
    "sample_training_noise_levels",
    "swap_scheduler",
    "upsample_condition",
]

# The submodules that `import diffusers_sr3` used to import, and so bind as attributes, before the names were lazy.
_EAGER_SUBMODULES = (
    "convert",
    "detail_windows",
    "image_io",
    "image_processing",
    "models",
    "noise",
    "pipelines",
    "tiling",
)

if TYPE_CHECKING:  # for type checkers and editors, which do not run `__getattr__`
    from .convert import CheckpointError, convert_original_checkpoint
    from .image_processing import degrade, images_to_tensor, upsample_condition
    from .models import SR3UNet2DModel, SR3UNet2DOutput
    from .noise import (
        make_beta_schedule,
        make_scheduler,
        noise_level_for_step,
        sample_training_noise_levels,
        swap_scheduler,
    )
    from .pipelines import (
        SR3BasePipeline,
        SR3CascadePipeline,
        SR3CascadePipelineOutput,
        SR3Pipeline,
        SR3PipelineOutput,
        SR3UnconditionalPipeline,
    )
    from .pipelines.base import (
        finish_interrupted_save,
        register_remote_code_modules,  # noqa: F401 (public, not in __all__, as before)
    )


def __getattr__(name: str) -> Any:
    """Import a public name's submodule on first use, or a submodule asked for as an attribute
    (`diffusers_sr3.pipelines`, `diffusers_sr3.backends`)."""
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY_NAMES[name]}"), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if not name.startswith("_"):
        # Any submodule (`diffusers_sr3.backends.use_backend`), as an eager import of all of them would bind it.
        try:
            return importlib.import_module(f"{__name__}.{name}")  # the import binds it here too
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":  # a submodule that exists, missing a dependency of its own
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> List[str]:
    # As the eager import listed: the public names and submodules, not this file's helpers.
    bound = {
        name
        for name, value in globals().items()
        if name.startswith("__") or (isinstance(value, types.ModuleType) and value.__name__.startswith(f"{__name__}."))
    }
    return sorted(bound | set(_LAZY_NAMES) | set(_EAGER_SUBMODULES))
