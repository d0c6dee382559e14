"""BentoML service for the champion model (loads it through registry/, never training code)."""
