"""Running decoder layers for dynamic analyses (paper §5): layer ranges with a forced all-expert capture
(`layers`), and what-if passes whose rows route differently, with the next-token loss (`causal`)."""
from .layers import LayerCapture, LayerRange, SequenceError, check_sequence, layer_keys

__all__ = ["LayerCapture", "LayerRange", "SequenceError", "check_sequence", "layer_keys"]
