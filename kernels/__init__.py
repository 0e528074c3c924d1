"""Fused GPU kernels beside their plain-torch references (imported as `voicepipe.kernels`)."""
