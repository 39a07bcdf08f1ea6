"""Model definitions: the Infinity transformer, its configuration, schedules and rope."""
