"""qpcell: deep-learning cell detection and classification for QuPath point annotations."""

__version__ = "0.1.0"
