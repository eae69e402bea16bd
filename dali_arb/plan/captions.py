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
        prefix, suffix: text put before and after every caption that is not dropped (kohya's ``caption_prefix`` /
            ``caption_suffix``; never shuffled or dropped with the tags).
        instance_prompt: the caption of a sample that has none (kohya's class tokens of a ``10_sks dog`` folder).
        tag_dropout: probability that each tag after the kept ones is left out (kohya's ``caption_tag_dropout_rate``).
        keep_separator: kohya's ``keep_tokens_separator``: in ``a, b ||| c, d ||| e``, the tags before the first
            separator stay in front and those after a second one at the end; only the ones between are shuffled or
            dropped (it replaces ``keep_tags`` where a caption holds it).
        kohya_order: apply the options in kohya's order (``library/train_util.py`` ``process_caption``): the
            prefix and suffix are joined to the caption with a space *before* its tags are split (so they count
            in ``keep_tags`` and move with the first and last tag), the tags are split only when ``shuffle_tags``
            or ``tag_dropout`` is on (kohya leaves a ``keep_separator`` in the text otherwise), empty tags are
            kept, and tags are joined with ``", "`` whatever the separator. Set by the kohya config reader.
        secondary_separator: kohya's ``secondary_separator``: it does not split tags (``a;;;b`` is one tag, shuffled
            and dropped whole), and becomes ``separator`` once the tags are placed.
        dropout_every_epochs: kohya's ``caption_dropout_every_n_epochs``: every caption is ``""`` in each n-th epoch
            (kohya counts epochs from 1: ours ``n - 1``, ``2n - 1``...; 0: never).
    """

    dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tags: int = 0
    separator: str = ","
    prefix: str = ""
    suffix: str = ""
    instance_prompt: str = ""
    tag_dropout: float = 0.0
    keep_separator: str = ""
    kohya_order: bool = False
    secondary_separator: str = ""
    dropout_every_epochs: int = 0

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
        for name, value in (("caption_prefix", self.prefix), ("caption_suffix", self.suffix),
                            ("instance_prompt", self.instance_prompt), ("keep_tags_separator", self.keep_separator)):  # fmt: skip
            if not isinstance(value, str):
                raise ConfigError(f"{name} must be a string, got {value!r}")
        if not isinstance(self.secondary_separator, str):
            raise ConfigError(f"secondary_separator must be a string, got {self.secondary_separator!r}")
        n = self.dropout_every_epochs
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"dropout_every_epochs must be a non-negative integer, got {n!r}")
        if not isinstance(self.kohya_order, bool):
            raise ConfigError(f"kohya_order must be True or False, got {self.kohya_order!r}")
        t = self.tag_dropout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise ConfigError(f"tag_dropout must be a probability in [0, 1], got {t!r}")

    def to_dict(self) -> dict:
        """The options as JSON-ready data (for ``state_dict``)."""
        out = {
            "dropout": float(self.dropout),
            "shuffle_tags": self.shuffle_tags,
            "keep_tags": self.keep_tags,
            "separator": self.separator,
        }
        # the later options only where set, so that states saved before they existed still match
        extra = {"prefix": self.prefix, "suffix": self.suffix, "instance_prompt": self.instance_prompt,
                 "tag_dropout": float(self.tag_dropout), "keep_separator": self.keep_separator,
                 "kohya_order": self.kohya_order, "secondary_separator": self.secondary_separator,
                 "dropout_every_epochs": self.dropout_every_epochs}  # fmt: skip
        return {**out, **{k: v for k, v in extra.items() if v}}

    def apply(self, text: str | None, rng: np.random.Generator) -> str:
        """The caption drawn from the stored ``text`` (``None``: no caption) with ``rng``.

        The draws are made in a fixed order (line, dropout, shuffle) whatever the options, so turning
        one option on never changes what another one draws."""
        lines = caption_lines(text)
        pick = rng.integers(len(lines)) if len(lines) > 1 else 0
        dropped = rng.random() < self.dropout
        caption = lines[pick] if lines else self.instance_prompt
        if dropped:
            return ""
        if self.kohya_order:
            return self._kohya(caption, rng)
        split = bool(self.keep_separator) and self.keep_separator in caption
        if self.shuffle_tags or self.tag_dropout > 0 or split:
            caption = self._tags(caption, rng, split=split)
        if self.secondary_separator:
            caption = caption.replace(self.secondary_separator, self.separator)
        return " ".join(part for part in (self.prefix, caption, self.suffix) if part)

    def _kohya(self, caption: str, rng: np.random.Generator) -> str:
        """The caption (not dropped) in kohya's order: prefix and suffix first, then the tags (:attr:`kohya_order`)."""
        if self.prefix:
            caption = self.prefix + " " + caption
        if self.suffix:
            caption = caption + " " + self.suffix
        if self.shuffle_tags or self.tag_dropout > 0:
            caption = self._tags(caption, rng, split=bool(self.keep_separator) and self.keep_separator in caption)
        return caption.replace(self.secondary_separator, self.separator) if self.secondary_separator else caption

    def _tags(self, caption: str, rng: np.random.Generator, *, split: bool) -> str:
        """The caption's tags, the kept ones in front (and after a second ``keep_separator`` at the end), the others
        shuffled (``shuffle_tags``) and then each left out with probability ``tag_dropout``; draws in that order."""

        def tags_of(text: str) -> list[str]:
            return [tag for tag in (t.strip() for t in text.split(self.separator)) if tag]

        if split:
            parts = caption.split(self.keep_separator)
            kept, rest, last = tags_of(parts[0]), tags_of(parts[1]), tags_of(self.separator.join(parts[2:]))
        else:
            tags = [t.strip() for t in caption.strip().split(self.separator)] if self.kohya_order else tags_of(caption)
            kept, rest, last = tags[: self.keep_tags], tags[self.keep_tags :], []
        if self.shuffle_tags:
            rest = [rest[i] for i in rng.permutation(len(rest))]
        if self.tag_dropout > 0:
            rest = [tag for tag, u in zip(rest, rng.random(len(rest))) if u >= self.tag_dropout]
        return (", " if self.kohya_order else self.separator + " ").join(kept + rest + last)

    def batch(self, texts: list[str | None], *, seed: int, epoch: int, step: int, offset: int) -> list[str]:
        """Captions of one batch; ``texts[i]`` is the stored caption of the sample at global position
        ``offset + i`` of ``step`` of ``epoch``."""
        if self.dropout_every_epochs and (epoch + 1) % self.dropout_every_epochs == 0:
            return [""] * len(texts)
        return [
            self.apply(text, np.random.default_rng([seed, epoch, step, offset + i, CAPTION_STREAM]))
            for i, text in enumerate(texts)
        ]
