"""Convert timm Vision Transformers into spiking neural networks.

    from convert import convert
    snn = convert(ann, calibration_images, timesteps=16)
    per_step = snn.simulate(images)      # [T, batch, classes] running means
    save(snn, "snn.safetensors"); snn2 = load("snn.safetensors")
    report = energy_report(snn, images)
    snn = finetune(snn, (train_images, train_labels), epochs=1)   # BPTT over snn.timesteps
"""
from convert.api import DEFAULTS, convert
from convert.checkpoint import load, save
from convert.energy import energy_report
from convert.finetune import finetune
from convert.network import SpikingModel
from convert.rewrite import UnsupportedModuleError, register

__all__ = ["convert", "save", "load", "finetune", "energy_report", "SpikingModel", "UnsupportedModuleError", "register",
           "DEFAULTS"]
