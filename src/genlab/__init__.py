"""genlab: a laboratory for image generative models."""

__version__ = "0.1.0"


def __getattr__(name):
    # The API is imported lazily so that `import genlab` (and `genlab --help`) stays fast.
    if name in ("train", "load_run", "sample", "Run"):
        from genlab import api

        return getattr(api, name)
    raise AttributeError(f"module 'genlab' has no attribute {name!r}")
