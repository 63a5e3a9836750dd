"""cifarcnn: train, monitor, evaluate and serve convolutional image classifiers on CIFAR-10."""

__version__ = "0.1.0"
