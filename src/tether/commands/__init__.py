"""CLI command modules; each exposes `register(app, sim_app)`."""
