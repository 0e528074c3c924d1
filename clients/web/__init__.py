"""The browser demo, served by the server at `/` (package data only)."""
