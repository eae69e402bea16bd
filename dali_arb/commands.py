"""Loader commands of ``dali-arb`` (preview, bench, demo); registered into the parser by cli.py."""

from __future__ import annotations
