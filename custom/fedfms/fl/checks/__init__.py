"""What the server checks: every update before aggregation, and whether sites (and the run) are still there."""
