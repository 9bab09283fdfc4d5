"""Model build toolkit: train the bundled models and publish them to a model repository."""
