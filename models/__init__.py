"""The ANN side (model zoo, reference ViT, data) and the spiking building blocks."""
from models.zoo import ALIASES, create_ann, resolve_name  # importing zoo registers vit_fmnist with timm

__all__ = ["ALIASES", "create_ann", "resolve_name"]
