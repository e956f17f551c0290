"""pkd: Patient Knowledge Distillation on the CPU."""

__version__ = "0.1.0"
