"""NVFlare filters of fedfms: what a site's task data and results go through."""
