"""Decoders: chosen once per loader, each holding its external-source outputs, its part of the DALI
graph and its defaults.

=========  ==========================================  ===========================================
decoder    the worker processes                        the DALI graph
=========  ==========================================  ===========================================
``dali``   read encoded bytes; compute the crop        ``decoders.image`` (nvJPEG / the hardware
           window in source pixels                     JPEG decoder on GPU, libjpeg-turbo on CPU),
                                                       then ``resize`` of the window to the bucket
``pillow`` read, decode (libjpeg-turbo; at a reduced   nothing: the finished crop goes on (to the
``opencv`` DCT scale where ``jpeg_scaling`` allows),   GPU, if there is one)
           resize to the bucket, crop
=========  ==========================================  ===========================================

Both then share ``crop_mirror_normalize`` (flip, scale, NCHW) in ``pipeline.py``. The package: ``base.py``
(:class:`Decoder`, shared helpers), one module per decoder (``dali.py``, ``pillow.py``, ``opencv.py``) and
``registry.py`` (:data:`DECODERS`, the one table by name, and :func:`choose_decoder`). A new decoder is one
module and one line in :data:`DECODERS`. Decoder objects are small and picklable: they travel to the worker
processes inside the source. DALI is imported only inside :meth:`Decoder.graph`.
"""

from __future__ import annotations

from .base import JPEG_SCALINGS, QUALITY_MARGIN, Decoder, cpu_count, jpeg_reduction, reduction_margin
from .dali import DaliDecoder
from .opencv import ANTIALIAS_SIGMA, OpenCVDecoder, opencv_flags, opencv_gray_flags
from .pillow import PillowDecoder
from .registry import AUTO, DECODERS, HINTS, choose_decoder, decoder_help, register_decoder

__all__ = [
    "ANTIALIAS_SIGMA",
    "AUTO",
    "DECODERS",
    "HINTS",
    "JPEG_SCALINGS",
    "QUALITY_MARGIN",
    "DaliDecoder",
    "Decoder",
    "OpenCVDecoder",
    "PillowDecoder",
    "choose_decoder",
    "cpu_count",
    "decoder_help",
    "jpeg_reduction",
    "opencv_flags",
    "opencv_gray_flags",
    "reduction_margin",
    "register_decoder",
]
