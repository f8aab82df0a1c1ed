"""The delta core: targeting, forms, policies, the registry, artifacts. It names no method."""
