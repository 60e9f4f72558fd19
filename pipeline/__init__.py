"""edgepipe: labelled photos in, verified TFLite and TF.js image classifiers out."""
__version__ = "0.1.0"
