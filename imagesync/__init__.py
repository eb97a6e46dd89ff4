"""imagesync: keep Glance images in the stores an operator's policy names."""

__version__ = "0.1.0"
