"""mergekit-lite: grow dense Hugging Face checkpoints into MoE or deeper models (`moemerge`)."""

__version__ = "0.1.0"
