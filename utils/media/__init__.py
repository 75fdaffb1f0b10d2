"""Client media: decoding, remote fetch behind its guard, per-item options, temp files."""
