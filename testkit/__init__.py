"""Real local servers (SeaweedFS S3, PostgreSQL) and synthetic video clips for tests, the demo and training."""
