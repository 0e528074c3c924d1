"""Tests of the browser demo (clients/web) in a real browser and under Node."""
