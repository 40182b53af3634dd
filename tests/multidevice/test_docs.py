"""The code blocks of docs/sharding.md, each run as written on 8 CPU host devices (each
block asserts what the page says of it)."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "sharding.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_doc_has_blocks():
    assert len(BLOCKS) == 5, len(BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_doc_block(index):
    assert jax.device_count() == 8
    exec(compile(BLOCKS[index], f"docs/sharding.md block {index}", "exec"), {"__name__": "__doc_block__"})
