"""mssar: Multi-Scale Spatially-Asymmetric Recalibration (Wang et al., ECCV 2018), reproduced."""

__version__ = "0.1.0"
