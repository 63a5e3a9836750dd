"""The shared base every job stands on: config, errors, storage, progress, device, precision, the model
registry, the one inference path and the figure primitives. Imports nothing above it."""
