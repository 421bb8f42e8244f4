"""Integrations with other libraries: HuggingFace causal LMs and token data (``hf``)."""
