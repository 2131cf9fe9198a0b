"""The appliance: a self-contained local LLM server speaking the OpenAI API."""

__version__ = "0.2.0"
