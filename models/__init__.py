"""Model definitions: a validated config and an nn.Module for each family."""
