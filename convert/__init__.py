"""Convert timm Vision Transformers into spiking neural networks.

    from convert import convert
    snn = convert(ann, calibration_images, timesteps=16)
    per_step = snn.simulate(images)      # [T, batch, classes] running means
"""
from convert.api import DEFAULTS, convert
from convert.network import SpikingModel
from convert.rewrite import UnsupportedModuleError, register

__all__ = ["convert", "SpikingModel", "UnsupportedModuleError", "register", "DEFAULTS"]
