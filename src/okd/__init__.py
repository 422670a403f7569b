"""okd: knowledge distillation for autoregressive language models, with Online Knowledge Distillation."""

__version__ = "0.1.0"
