"""amd_jax: asymmetric masked distillation (AMD) and MAE-family pre-training in JAX/Flax.

Submodules: models (ViT encoder, decoders), masking, targets, losses, methods
(registry of pre-training methods), data (grain pipelines), train (the loop),
probe (kNN / linear probe), convert (PyTorch checkpoints).
"""
__version__ = "0.1.0"
