"""The latency benchmark command line, `voicepipe-bench` (imported as `voicepipe.bench`)."""
