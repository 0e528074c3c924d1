# The two commands of the README. Extra server flags: make serve ARGS="--port 9000".
.PHONY: serve test lint

serve:
	./scripts/setup.sh
	.venv/bin/voicepipe serve $(ARGS)

test:
	./scripts/setup.sh --dev
	.venv/bin/python -m pytest $(ARGS)

lint:
	.venv/bin/ruff check .
