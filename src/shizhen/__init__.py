"""ShizhenGPT serving: an OpenAI-compatible API for the Traditional Chinese Medicine VL model."""

__version__ = "0.1.0"
