"""Examples of a user's own attack, defense, model and dataset, each registered from its own
module without touching the package; `plugins_config.py` uses them from a config file."""
