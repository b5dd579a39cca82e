"""One file per technique; each registers itself with `repro.registry.register`."""
