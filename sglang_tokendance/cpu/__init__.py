"""CPU stand-ins for the CUDA-only pieces SGLang imports (see ``bootstrap``)."""
