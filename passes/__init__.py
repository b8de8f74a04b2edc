"""Graph passes of fxptqat, installed as ``fxptqat.passes``."""
