"""usearch 2.26.2-2.26.6 crash the process when imported before onnxruntime: keep the pin honest."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("order", [("usearch.index", "onnxruntime"), ("onnxruntime", "usearch.index")])
def test_usearch_and_onnxruntime_import_in_either_order(order: tuple[str, str]) -> None:
    code = (
        f"import {order[0]}, {order[1]}\n"
        "import numpy as np\n"
        "from usearch.index import Index\n"
        "ix = Index(ndim=8, metric='cos', dtype='f16')\n"
        "ix.add(np.arange(4, dtype=np.uint64), np.eye(4, 8, dtype=np.float32))\n"
        "print(int(ix.search(np.eye(1, 8, dtype=np.float32)[0], 1).keys[0]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"
