"""Seed 001's entry, kept: `python utils/download_model.py ...` and `python -m utils.download_model ...`
run the Hub downloader, which lives in utils/hub/download.py (import it from there)."""
import sys
from pathlib import Path

if __name__ == "__main__":
    if not __package__:  # run as a file: the project folder is the import root
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from utils.hub.download import main
    sys.exit(main())
