"""The Hugging Face custom code that `architecture: moemerge` writes into model folders (kept byte-exact)."""
