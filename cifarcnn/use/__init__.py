"""Using a trained model: evaluate, predict and export (and serving), all through the base's one inference
path. Imports training (the checkpoint reader), data and the base."""
