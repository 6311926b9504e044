"""Data for the SAE template (protected)."""

SEED = 0


def settings_from_env():
    raise NotImplementedError
