"""cifarcnn: train, monitor, evaluate and serve convolutional image classifiers on CIFAR-10."""

from importlib import metadata

try:
    __version__ = metadata.version("cifarcnn")  # pyproject.toml's version, as installed
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
