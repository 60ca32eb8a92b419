"""Switches that put rfm_fast underneath other RFM code.

``rfm_fast.integrations.xrfm``: make the xrfm package (PyPI ``xrfm``) compute the AGOP and the predictions of its
Laplace and Gaussian kernels through rfm_fast, with one line::

    from rfm_fast.integrations.xrfm import use_rfm_fast
    with use_rfm_fast():
        model.fit(train, val)

Integration modules import their host library only when a switch is used, never when this package is imported.
"""

from __future__ import annotations

__all__ = ["xrfm"]


def __getattr__(name: str):
    if name in __all__:
        import importlib

        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
