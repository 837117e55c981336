"""llava-ray: train and serve LLaVA-style vision-language models on Ray."""

__version__ = "0.1.0"
