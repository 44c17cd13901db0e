# The two commands a newcomer needs:
#   make demo   run the server on the embedded demo config (no Postfix needed)
#   make test   install what the tests need (Debian's Postfix, Python deps) and run them all
.PHONY: demo test conformance lint bench

demo:
	@scripts/venv.sh speed
	.venv/bin/pyproxymap serve --demo

test:
	@scripts/install-test-deps.sh
	.venv/bin/python -m pytest -q

conformance:
	@scripts/install-test-deps.sh
	.venv/bin/python -m pytest -q tests/conformance

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

bench:
	@scripts/venv.sh all
	.venv/bin/python bench/compare.py
