"""Reproductions of the classic batch-norm experiments with jaxnorm; ``python -m experiments`` runs them all."""

EXPERIMENTS = ("framework_parity", "deep_mlp_scale", "two_circles", "bad_init", "lenet", "batch_renorm")
