"""``vitlens app``: an interactive explorer in the browser (Gradio; ``pip install "vitlens[app]"``).

* :mod:`vitlens.app.core`: what the app computes (images and their one clean forward, maps through
  :func:`vitlens.explain`, insertion/deletion curves through :mod:`vitlens.metrics`), no web framework;
* :mod:`vitlens.app.params`: the parameter controls generated from the methods' declared parameters;
* :mod:`vitlens.app.bench_view`: a bench folder, read-only and confined to that folder;
* :mod:`vitlens.app.ui`: the Gradio page; :mod:`vitlens.app.cli`: the ``vitlens app`` command.
"""
from __future__ import annotations

__all__ = ["Explorer", "serve", "MAX_UPLOAD_MB", "MAX_PIXELS"]

#: default caps of an uploaded image (``vitlens app --max-upload-mb / --max-pixels``)
MAX_UPLOAD_MB = 20
MAX_PIXELS = 50_000_000


def __getattr__(name: str):  # lazy: ``vitlens --help`` must not import torch through the app's parser
    if name == "Explorer":
        from .core import Explorer

        return Explorer
    raise AttributeError(name)


def serve(model, *, bench=None, bench_images=None, host: str = "127.0.0.1", port: int = 7860, block: bool = True,
          **explorer_kwargs):
    """Start the app on ``model`` (a :class:`vitlens.ViTAdapter` or supported module); returns (demo, url).

    ``bench``: a ``vitlens bench`` output folder for the Bench view; ``block=False`` returns at once (close
    the server with ``demo.close()``)."""
    from .bench_view import BenchView
    from .core import Explorer
    from .ui import launch

    view = BenchView(bench, bench_images) if bench is not None else None
    return launch(Explorer(model, **explorer_kwargs), view, host=host, port=port, block=block)
