"""Session-wide model fixtures (a pytest plugin: ``pytest_plugins`` in ``tests/conftest.py``).

The PP-OCR models come from ``tests.models``, which downloads them once per cache; here
they are read once per session. A failed download is an error, never a skip.
"""

from __future__ import annotations

import pytest
from tests.models import ppocr_model, small_model


@pytest.fixture(scope="session")
def small_onnx_model() -> bytes:
    """The tiny deterministic classifier (float32[1,16] -> float32[1,4])."""
    return small_model()


@pytest.fixture(scope="session")
def ppocr_rec_model() -> bytes:
    """PP-OCRv4 text recognition (10.9 MB, real weights from the rapidocr wheel)."""
    return ppocr_model("ch_PP-OCRv4_rec_infer.onnx")


@pytest.fixture(scope="session")
def ppocr_det_model() -> bytes:
    """PP-OCRv4 text detection (4.7 MB)."""
    return ppocr_model("ch_PP-OCRv4_det_infer.onnx")


@pytest.fixture(scope="session")
def ppocr_cls_model() -> bytes:
    """PP-OCR mobile text-direction classifier (0.6 MB; input float32[1,3,48,192])."""
    return ppocr_model("ch_ppocr_mobile_v2.0_cls_infer.onnx")
