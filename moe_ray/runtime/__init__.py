"""Running decoder layers for dynamic analyses (paper §5): layer ranges with a forced all-expert capture."""
from .layers import LayerCapture, LayerRange, SequenceError, check_sequence, layer_keys

__all__ = ["LayerCapture", "LayerRange", "SequenceError", "check_sequence", "layer_keys"]
