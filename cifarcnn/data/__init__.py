"""Getting images in: the official CIFAR files, folder datasets, image decoding, and the loader with its
augmentation. Imports only the base."""
