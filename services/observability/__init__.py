"""What every service exposes to operators: health and metrics endpoints, metrics, JSON logs."""
