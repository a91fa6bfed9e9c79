"""Generates the parts of MilterMonkey's documentation site that must match the code.

Used by the site build (``docs/_gen/mkdocs_hooks.py``) and by the docs
meta-tests (``tests/meta/test_docs.py``), so both see the same output.
"""
