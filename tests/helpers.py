"""Shared by the tests (and the scripts they launch under torchrun)."""


def spread_reward(text, sample, mode="think"):
    """A reward with spread on a random model (the real one is 0 for every response), so advantages are non-zero."""
    return dict(reward=(len(text) % 3) / 2, accuracy=0.0, format=0.0)
