"""Continued pretraining: data (tokenise + pack), the accelerate loop, MoE router losses, saving."""
