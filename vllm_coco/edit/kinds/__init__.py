"""The built-in edit kinds, one module each (edit/kind.py says what a kind is; edit/registry.py lists them)."""
