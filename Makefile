# The two commands a new user needs: `make demo` and `make test`. Each installs
# what it needs (apt redis-server where apt exists, a .venv with pip packages).
PY := .venv/bin/python
VENV_STAMP := .venv/.installed-$(shell cat pyproject.toml clients/python/pyproject.toml scripts/install.sh | sha1sum | cut -c1-12)

.PHONY: demo test lint proto bench clean-venv

$(VENV_STAMP): pyproject.toml clients/python/pyproject.toml scripts/install.sh
	@scripts/install.sh
	@touch $@

demo: $(VENV_STAMP)
	$(PY) -m rlfleet.cli.main demo --json runs/demo.json

test: $(VENV_STAMP)
	$(PY) -m ruff check services tests bench clients
	$(PY) -m pytest tests

lint: $(VENV_STAMP)
	$(PY) -m ruff check services tests bench clients
	$(PY) -m ruff format --check services tests bench clients

proto: $(VENV_STAMP)
	scripts/gen_proto.sh

clean-venv:
	rm -rf .venv
