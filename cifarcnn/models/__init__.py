"""The model architectures, one module per family, the contract a model keeps with the trainer, and the
registry that builds them by name. Imports nothing else of the package (the base's config reads the
registry)."""
