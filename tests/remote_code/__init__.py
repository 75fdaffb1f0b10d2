"""A tiny custom architecture whose code ships inside its checkpoint folder (tests/test_remote_code.py)."""
