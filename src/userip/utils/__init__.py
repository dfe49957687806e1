"""Small shared helpers: atomic file writes, logging, seeding, validated configs."""
