"""MkDocs hooks: generated tables and references are filled in as each page is read.

MkDocs loads this file by path (``hooks:`` in ``mkdocs.yml``); the generator
package beside it is put on ``sys.path`` so the meta-tests can import the
same code without MkDocs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

sys.path.insert(0, str(Path(__file__).resolve().parent))

from miltermonkey_docs.introspect import GenerationError
from miltermonkey_docs.pages import render


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace the page's ``<!-- generated: ... -->`` markers; a mismatch stops the build."""
    try:
        return render(markdown)
    except GenerationError as e:
        raise PluginError(f"{page.file.src_uri}: {e}") from None
