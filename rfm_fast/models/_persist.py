"""save / load of fitted models as plain data: tensors, lists, dicts, strings and numbers only, so that
``torch.load(path)`` with its default ``weights_only=True`` reads them (no pickled code is ever executed on load).

The file holds {"format": FORMAT, "class": name, "version": rfm_fast's, "params": get_params(), "state": the
fitted attributes (names ending in "_")}, each value encoded by :func:`_encode`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

FORMAT = "rfm_fast-model-1"


def _encode(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).replace("torch.", "")}
    if isinstance(value, torch.device):
        return {"__device__": str(value)}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"__dataclass__": type(value).__name__,
                "fields": {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, dict):
        return {"__dict__": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"__tuple__" if isinstance(value, tuple) else "__list__": [_encode(v) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot save a {type(value).__name__} ({value!r:.60})")


def _decode(value: Any, device: torch.device, classes: dict) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if not isinstance(value, dict):
        return value
    if "__dtype__" in value:
        return getattr(torch, value["__dtype__"])
    if "__device__" in value:
        return torch.device(value["__device__"])
    if "__ndarray__" in value:
        return np.asarray(value["__ndarray__"], dtype=value["dtype"])
    if "__dataclass__" in value:
        kind = classes[value["__dataclass__"]]
        return kind(**{k: _decode(v, device, classes) for k, v in value["fields"].items()})
    if "__dict__" in value:
        return {_decode(k, device, classes): _decode(v, device, classes) for k, v in value["__dict__"]}
    if "__list__" in value:
        return [_decode(v, device, classes) for v in value["__list__"]]
    if "__tuple__" in value:
        return tuple(_decode(v, device, classes) for v in value["__tuple__"])
    raise ValueError(f"unrecognised saved value {value!r:.80}")


class Persist:
    """``save(path)`` and ``cls.load(path, device=None)`` for the estimators (see the module docstring)."""

    # Dataclasses a fitted model may hold (DeepRFM's layers), by name.
    _saved_classes: dict = {}

    def save(self, path) -> None:
        """Write the fitted model to ``path`` as plain data (loadable with torch.load's weights_only=True)."""
        from .. import __version__

        state = {k: _encode(v) for k, v in vars(self).items() if k.endswith("_") and not k.startswith("_")}
        if not state:
            raise ValueError(f"this {type(self).__name__} is not fitted yet: nothing to save")
        params = {k: _encode(v) for k, v in self.get_params(deep=False).items()}
        torch.save({"format": FORMAT, "class": type(self).__name__, "version": __version__, "params": params,
                    "state": state}, path)

    @classmethod
    def load(cls, path, device: Any = None):
        """A model saved by :meth:`save`. ``device``: where its tensors go (default: where they were, or the CPU
        when that device is not available here)."""
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path} is not an rfm_fast model file (format {FORMAT})")
        if data["class"] != cls.__name__:
            raise ValueError(f"{path} holds a {data['class']}, not a {cls.__name__}: use {data['class']}.load")
        saved = data["state"].get("device_")
        target = torch.device(device) if device is not None else _decode(saved, torch.device("cpu"), {})
        if not isinstance(target, torch.device) or (target.type == "cuda" and not torch.cuda.is_available()):
            target = torch.device("cpu")
        model = cls(**{k: _decode(v, target, cls._saved_classes) for k, v in data["params"].items()})
        for name, value in data["state"].items():
            setattr(model, name, _decode(value, target, cls._saved_classes))
        model.device_ = target
        return model
