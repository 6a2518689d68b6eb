"""distill: distributed knowledge distillation of large reasoning teachers into small students."""

__version__ = "0.1.0"
