"""Presets: one YAML job config per system and Gymnasium classic."""
