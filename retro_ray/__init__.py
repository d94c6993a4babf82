"""retro-ray: RETRO (Borgeaud et al. 2022) as a Ray-native pipeline."""

__version__ = "0.1.0"
