"""The shared base every job stands on: config, errors, storage, progress, device, precision, the one
inference path and the figure primitives. Imports only the models (config checks a model's name)."""
