"""The RETRO model: configuration and single-device PyTorch module."""

from retro_ray.model.retro import (
    IGNORE_INDEX,
    RetroCache,
    RetroConfig,
    RetroModel,
    RetroOutput,
    RetroSettings,
)

__all__ = ["IGNORE_INDEX", "RetroCache", "RetroConfig", "RetroModel", "RetroOutput", "RetroSettings"]
