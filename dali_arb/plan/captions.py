"""Caption tricks the trainers build by hand (kohya's ``shuffle_caption`` / ``keep_tokens`` /
``caption_dropout_rate``, SimpleTuner's multi-line caption files), drawn reproducibly.

A caption with several lines is several captions: one is drawn per sample per epoch. Lines end at ``\n``,
``\r\n`` or a lone ``\r`` only (:func:`caption_lines`); U+2028, U+0085, form feeds and the other breaks
``str.splitlines`` knows are text inside a caption. Then, with
probability ``dropout``, the caption becomes ``""`` (for classifier-free guidance). With ``shuffle_tags``
it is split at ``separator``, the first ``keep_tags`` tags stay in front, the rest are shuffled, and the
tags are joined with ``separator + " "``.

Every draw of a sample comes from ``np.random.default_rng([seed, epoch, step, position, CAPTION_STREAM])``
(``position``: the sample's place in the global batch), so it is the same on any world size and after a
resume. Imports only the standard library, NumPy and ``errors``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

__all__ = ["CaptionPolicy", "caption_lines"]

#: Separates the caption draws from every other per-sample draw of the same (seed, epoch, step, position).
CAPTION_STREAM = 0xCA9
#: What ends a line of a caption file: LF, CRLF, or a lone CR (old Mac editors).
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def caption_lines(text: str | None) -> list[str]:
    """The captions a stored caption holds: its non-blank lines, stripped. Only ``\n``, ``\r\n`` and ``\r``
    end a line (``str.splitlines`` would also cut at U+2028, U+0085, form feed and other characters that
    occur inside captions)."""
    return [line for line in (part.strip() for part in _LINE_BREAK.split(text or "")) if line]


@dataclass(frozen=True)
class CaptionPolicy:
    """How a sample's stored caption becomes the caption of a batch.

    Args:
        dropout: probability in ``[0, 1]`` that a caption becomes ``""``.
        shuffle_tags: shuffle the tags after the first ``keep_tags``.
        keep_tags: tags kept in front, in order (non-negative).
        separator: what separates tags (non-empty); tags are joined with ``separator + " "``.
    """

    dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tags: int = 0
    separator: str = ","

    def __post_init__(self) -> None:
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0:
            raise ConfigError(f"caption_dropout must be a probability in [0, 1], got {d!r}")
        if not isinstance(self.shuffle_tags, bool):
            raise ConfigError(f"shuffle_tags must be True or False, got {self.shuffle_tags!r}")
        if isinstance(self.keep_tags, bool) or not isinstance(self.keep_tags, int) or self.keep_tags < 0:
            raise ConfigError(f"keep_tags must be a non-negative integer, got {self.keep_tags!r}")
        if not isinstance(self.separator, str) or not self.separator.strip():
            raise ConfigError(f"tag_separator must be a non-empty string, got {self.separator!r}")

    def to_dict(self) -> dict:
        """The options as JSON-ready data (for ``state_dict``)."""
        return {
            "dropout": float(self.dropout),
            "shuffle_tags": self.shuffle_tags,
            "keep_tags": self.keep_tags,
            "separator": self.separator,
        }

    def apply(self, text: str | None, rng: np.random.Generator) -> str:
        """The caption drawn from the stored ``text`` (``None``: no caption) with ``rng``.

        The draws are made in a fixed order (line, dropout, shuffle) whatever the options, so turning
        one option on never changes what another one draws."""
        lines = caption_lines(text)
        pick = rng.integers(len(lines)) if len(lines) > 1 else 0
        dropped = rng.random() < self.dropout
        caption = lines[pick] if lines else ""
        if dropped:
            return ""
        if not self.shuffle_tags:
            return caption
        tags = [tag.strip() for tag in caption.split(self.separator)]
        tags = [tag for tag in tags if tag]
        kept, rest = tags[: self.keep_tags], tags[self.keep_tags :]
        order = rng.permutation(len(rest))
        return (self.separator + " ").join(kept + [rest[i] for i in order])

    def batch(self, texts: list[str | None], *, seed: int, epoch: int, step: int, offset: int) -> list[str]:
        """Captions of one batch; ``texts[i]`` is the stored caption of the sample at global position
        ``offset + i`` of ``step`` of ``epoch``."""
        return [
            self.apply(text, np.random.default_rng([seed, epoch, step, offset + i, CAPTION_STREAM]))
            for i, text in enumerate(texts)
        ]
