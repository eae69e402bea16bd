"""Where ``build_index`` runs the readers: the engines.

- ``local`` (the default): worker processes on this machine (``index/driver.py``, the path ``build_index`` has
  always taken).
- ``ray``: Ray tasks across a cluster (:mod:`.ray`): each source, or slice of a folder or prefix, becomes a task
  that writes one Parquet part; keys are de-duplicated across parts by hash partition (``index/dedupe.py``). Ray is
  optional (``pip install 'dali-arb[ray]'``) and imported only when this engine runs.

Both write the same rows for the same sources (order aside).
"""

from __future__ import annotations

from ...errors import ConfigError

__all__ = ["ENGINES", "check_engine"]

#: The engines by name, with what each is, in words (the CLI's help).
ENGINES = {
    "local": "worker processes on this machine",
    "ray": "Ray tasks on a cluster (pip install 'dali-arb[ray]')",
}


def check_engine(engine: str, address: str | None) -> None:
    """A ConfigError for an unknown ``engine``, or an ``address`` given without ``engine="ray"``."""
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if address is not None and engine != "ray":
        raise ConfigError(f"--address {address} names a Ray cluster: give it with --engine ray")
    if address is not None and (not isinstance(address, str) or not address.strip()):
        raise ConfigError(f"address must name a Ray cluster ('auto', 'HOST:PORT', 'ray://HOST:10001'), got {address!r}")
