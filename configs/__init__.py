"""Preset TurboQuant configs (YAML); the repo's configs/ folder, installed as `sglang_tq.configs`."""
