"""The WebSocket/HTTP server and the `voicepipe` command line (imported as `voicepipe.server`)."""
