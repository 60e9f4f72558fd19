"""Shared test helpers; test modules import from here, never from one another.

- :mod:`tests.helpers.world`: the tiny world (a batch-1 MobileNet-shaped graph, solid-colour image
  folders), the paths of ``../shared`` and ``needs_shared``.
- :mod:`tests.helpers.chain`: whole chains built in-process through :func:`pipeline.run`, the
  session chain's options, copies of a run directory, and edgepipe's log lines.
- :mod:`tests.helpers.cli`: ``edgepipe ...`` in a subprocess, and SIGKILL at a pause point.
- :mod:`tests.helpers.servers`: HTTP servers on 127.0.0.1 (a misbehaving one, a static folder).
- :mod:`tests.helpers.lookalikes`: small graphs packed like the catalog's official downloads.
- :mod:`tests.helpers.browser`: headless Chromium, or a failure saying how to get it.

Importing this package imports nothing: processes started with ``spawn`` import
``tests.helpers.servers`` without TensorFlow or pytest's test modules.
"""
