"""One module per runtime behind :class:`pipeline.runners.base.Runner`."""
