"""Settings: models.yaml + environment -> typed, validated settings; runtime settings; reload."""
