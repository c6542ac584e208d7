"""Remote experience sources: versioned wire formats, transports, validation."""
