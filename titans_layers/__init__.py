"""titans_layers: composable Titans neural-memory layers in the style of flash-linear-attention."""

__version__ = "0.1.0"
