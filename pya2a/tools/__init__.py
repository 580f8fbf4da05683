"""Command-line tools: ``python -m pya2a bench | tune | info`` and the GPU benchmark."""
