"""THE table of decoders by name: ``decoder=`` / ``--decoder`` values, ``choose_decoder``, the CLI's choices and
help, and the "unknown decoder" message all read :data:`DECODERS`. A new decoder is one module defining a
:class:`~dali_arb.loader.decoders.base.Decoder` subclass and one line in :data:`DECODERS` (or, from outside the
package, :func:`register_decoder`). Imports the decoder modules; no DALI.
"""

from __future__ import annotations

from typing import Any

from ...errors import ConfigError
from .base import Decoder, reduction_margin
from .dali import DaliDecoder
from .opencv import OpenCVDecoder
from .pillow import PillowDecoder

__all__ = ["AUTO", "DECODERS", "HINTS", "check_decoder_name", "choose_decoder", "decoder_help", "register_decoder"]

#: Every decoder, by the name that picks it (in the order the CLI lists them).
DECODERS: dict[str, type[Decoder]] = {
    "dali": DaliDecoder,
    "pillow": PillowDecoder,
    "opencv": OpenCVDecoder,
}
#: What ``decoder="auto"`` picks on each device: where it is the fastest at the same quality (RESULTS.md).
AUTO: dict[str, str] = {"gpu": "dali", "cpu": "opencv"}
#: Settings the loader computes for whichever decoder takes them (not a user's choice): any other decoder drops them.
HINTS: tuple[str, ...] = ("preallocate",)


def register_decoder(cls: type[Decoder]) -> type[Decoder]:
    """Add ``cls`` to :data:`DECODERS` under ``cls.name`` (usable as a class decorator; returns ``cls``). A
    ConfigError when it is no :class:`Decoder` subclass, or its name is ``"auto"`` or another decoder's."""
    if not (isinstance(cls, type) and issubclass(cls, Decoder)):
        raise ConfigError(f"a decoder must be a subclass of Decoder, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name == "auto":
        raise ConfigError(f"a decoder needs a name of its own (not 'auto'), got {name!r} for {cls.__name__}")
    if DECODERS.get(name, cls) is not cls:
        raise ConfigError(f"decoder {name!r} is already {DECODERS[name].__name__}; give {cls.__name__} another name")
    DECODERS[name] = cls
    return cls


def _alternatives(names: list[str]) -> str:
    """``'a', 'b' or 'c'``."""
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def decoder_help() -> str:
    """The ``--decoder`` help: each decoder's :attr:`~Decoder.summary`, then what ``auto`` picks."""
    each = "; ".join(f"{name}: {cls.summary or cls.__name__}" for name, cls in DECODERS.items())
    return f"who decodes: {each}; or auto (default: {AUTO['gpu']} on GPU, {AUTO['cpu']} on CPU)"


def check_decoder_name(name: object) -> str:
    """``name`` if it is ``"auto"`` or in :data:`DECODERS`, else a ConfigError naming every choice."""
    if not isinstance(name, str) or name not in ("auto", *DECODERS):
        raise ConfigError(f"decoder must be {_alternatives(['auto', *DECODERS])}, got {name!r}")
    return name


def _decoder_class(name: str, device: str) -> type[Decoder]:
    """The class ``name`` picks (``"auto"``: :data:`AUTO` for ``device``); a ConfigError naming every choice."""
    if check_decoder_name(name) == "auto":
        name = AUTO["gpu"] if device == "gpu" else AUTO["cpu"]
    return DECODERS[name]


def _refused(setting: str, value: Any, cls: type[Decoder]) -> ConfigError:
    """The error for ``setting=value`` given to decoder ``cls``, which does not take it."""
    owners = [n for n, c in DECODERS.items() if setting in c.settings]
    if not owners:
        known = sorted({s for c in DECODERS.values() for s in c.settings} | set(HINTS))
        return ConfigError(f"unknown decoder setting {setting}={value!r}; decoders take {', '.join(known)}")
    message = dict(cls.refusals).get(setting)
    if message:
        return ConfigError(message.format(name=cls.name, value=value, owners=_alternatives(sorted(owners))))
    return ConfigError(
        f"{setting} applies to decoder={_alternatives(owners)}, not to decoder={cls.name!r}; "
        f"drop {setting}={value!r} or choose another decoder"
    )


def choose_decoder(
    name: str | Decoder, device: str, *, pairs: tuple[tuple[str, str], ...] = (), **settings: Any
) -> Decoder:
    """The decoder for ``name`` (a key of :data:`DECODERS`, or ``"auto"``: :data:`AUTO` for ``device``); a
    :class:`Decoder` instance is used as it is. ``pairs`` are the manifest's paired images.

    ``settings`` go to the decoder that takes them (its :attr:`~Decoder.settings`: ``hw_decoder_load`` and
    ``preallocate`` to ``dali``, ``jpeg_scaling`` to the worker decoders); ``None`` values are ignored, so callers
    can pass their options through. Another decoder's setting is refused, unless it is a loader hint
    (:data:`HINTS`) or ``"auto"`` chose a decoder that ignores it (``jpeg_scaling`` on a GPU, where DALI decodes
    at full resolution). ``jpeg_scaling`` is validated whichever decoder it reaches.
    """
    given = {k: v for k, v in settings.items() if v is not None}
    if isinstance(name, Decoder):
        for setting in given:
            if setting not in HINTS:
                raise ConfigError(f"{setting} is a setting of the decoder by name; give it to the Decoder instance")
        return name.with_pairs(pairs)
    cls = _decoder_class(name, device)
    if "jpeg_scaling" in given:
        reduction_margin(given["jpeg_scaling"])
    taken = {}
    for setting, value in given.items():
        if setting in cls.settings:
            taken[setting] = value
        elif not (setting in HINTS or (name == "auto" and setting in cls.ignored_under_auto)):
            raise _refused(setting, value, cls)
    return cls(pairs=tuple(pairs), **taken)
