class WeightsError(ValueError):
    """A checkpoint problem, with a one-line message naming the file and the key or value at fault."""
