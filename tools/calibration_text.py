"""Write kvsvd/data/calibration.txt: English prose from NumPy's docstrings (their summaries and Notes,
no parameter lists, signatures or examples), the text ``kvsvd calibrate`` fits bases on. It shares no
text with the RULER haystacks (``essays.txt``, the noise sentences), so no evaluation prompt is ever
calibration text.

    .venv/bin/python tools/calibration_text.py
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import numpy.fft
import numpy.linalg
import numpy.ma
import numpy.polynomial
import numpy.random

HEADER = ("Prose from the docstrings of NumPy {version} (summaries and Notes sections). "
          "Copyright (c) 2005-2025, NumPy Developers; BSD-3-Clause license, https://numpy.org/doc/stable/license.html\n\n")


def paragraphs(doc: str) -> list[str]:
    """The prose paragraphs of a numpydoc docstring's summary and Notes sections."""
    sections = re.split(r"\n([A-Z][A-Za-z ]+)\n-{3,}\n", "\n" + doc)
    kept = [sections[0]] + [body for head, body in zip(sections[1::2], sections[2::2]) if head.strip() == "Notes"]
    out = []
    for para in "\n".join(kept).split("\n\n"):
        lines = para.strip().splitlines()
        if not lines or any(line.lstrip().startswith((">>>", "..", ":")) for line in lines):
            continue
        text = " ".join(line.strip() for line in lines)
        if len(text) >= 120 and text.count("(") <= 6 and "=" not in text[:60]:
            out.append(text)
    return out


def main() -> None:
    seen, parts = set(), []
    for module in (np, np.linalg, np.fft, np.random, np.polynomial, np.ma):
        for name in sorted(dir(module)):
            obj = getattr(module, name, None)
            if name.startswith("_") or isinstance(obj, (int, float, str, type(None))):
                continue
            doc = inspect.getdoc(obj)
            if doc and doc not in seen:
                seen.add(doc)
                parts += paragraphs(doc)
    path = Path(__file__).resolve().parents[1] / "kvsvd" / "data" / "calibration.txt"
    path.write_text(HEADER.format(version=np.__version__) + "\n\n".join(parts) + "\n")
    print(f"{path}: {len(parts)} paragraphs, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
