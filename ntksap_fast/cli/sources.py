"""Where the command line's models come from: a name, ``SOURCE:NAME`` or ``package.module:callable``.

* ``NAME``: ``ntksap_fast.models`` (``resnet20``, ``vgg16``, ...);
* ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None)``;
* ``timm:NAME``: ``timm.create_model(NAME, pretrained=False)``; its input shape is timm's
  ``pretrained_cfg["input_size"]`` (:func:`default_input_shape`);
* ``package.module:callable``: the user's own factory returning an ``nn.Module``, imported from
  ``PYTHONPATH`` or the current folder.

Every model is randomly initialised (never pretrained weights); ``num_classes=`` is passed when given.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable

import torch
from torch import nn

from ..models import MODELS

__all__ = ["build_model", "default_input_shape"]


def _user_factory(spec: str) -> Callable[..., object]:
    """The callable named by ``package.module:callable`` (dotted attributes allowed after the colon)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model: expected NAME, torchvision:NAME, timm:NAME or package.module:callable, got {spec!r}")
    folder = os.getcwd()
    search_here = folder not in sys.path  # as ``python -m`` does, for the import only
    if search_here:
        sys.path.append(folder)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"model {spec!r}: cannot import {module_name!r} ({err}); put its folder on PYTHONPATH or run from it"
        ) from None
    except Exception as err:  # the user's module failed while importing
        raise ValueError(f"model {spec!r}: importing {module_name!r} raised {type(err).__name__}: {err}") from None
    finally:
        if search_here:
            sys.path.remove(folder)
    try:
        factory = functools.reduce(getattr, attr.split("."), module)
    except AttributeError:
        raise ValueError(f"model {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(factory):
        raise ValueError(
            f"model {spec!r}: {attr!r} is a {type(factory).__name__}, expected a callable returning a torch.nn.Module"
        )
    return factory


def build_model(name: str, num_classes: int | None = None, seed: int | None = None) -> nn.Module:
    """A randomly initialised model (on the CPU), never pretrained weights.

    ``name``: a ``ntksap_fast.models`` name, ``torchvision:NAME``, ``timm:NAME`` or
    ``package.module:callable`` (the user's factory; ``num_classes=`` is passed when given). With
    ``seed`` the initialisation draws from ``torch.manual_seed(seed)`` and the global CPU random
    state is restored afterwards, so the same name and seed give the same weights. Raises
    ``ValueError`` for a model that cannot be found or built, ``ImportError`` when timm is missing.
    """
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    source, colon, rest = name.partition(":")
    if not colon:
        if name not in MODELS:
            raise ValueError(
                f"model: unknown model {name!r}; choose one of {sorted(MODELS)}, torchvision:NAME, "
                "timm:NAME or package.module:callable"
            )
        make = functools.partial(MODELS[name], **kwargs)
    elif source == "torchvision":
        import torchvision

        if rest not in torchvision.models.list_models():
            raise ValueError(f"model: torchvision has no model {rest!r} (see torchvision.models.list_models())")
        make = functools.partial(torchvision.models.get_model, rest, weights=None, **kwargs)
    elif source == "timm":
        if importlib.util.find_spec("timm") is None:
            raise ImportError(f"model {name!r} needs timm: pip install timm")
        import timm

        if not timm.is_model(rest):
            raise ValueError(f"model: timm has no model {rest!r} (see timm.list_models())")
        make = functools.partial(timm.create_model, rest, pretrained=False, **kwargs)
    else:
        make = functools.partial(_user_factory(name), **kwargs)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        try:
            model = make()
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"model {name!r}{f' with num_classes={num_classes}' if kwargs else ''}: {type(err).__name__}: {err}"
            ) from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r} returned a {type(model).__name__}, expected a torch.nn.Module")
    return model


def default_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """The input shape a model says it takes: its ``input_shape`` attribute (``ntksap_fast.models``),
    else timm's ``pretrained_cfg["input_size"]``; None when it says nothing."""
    shape = getattr(model, "input_shape", None)
    if shape is None:
        shape = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    return None if shape is None else tuple(int(s) for s in shape)
