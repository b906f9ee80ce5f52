# The two commands a newcomer runs: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test browser clean

$(BIN)/loralab: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: this takes the CPU wheel where one is provided locally.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(BIN)/loralab

demo: $(BIN)/loralab
	HF_HUB_OFFLINE=1 $(BIN)/loralab demo --out demo-output

# The report's browser test drives Debian's Chromium. Installed when missing and possible (root with
# apt-get, as in CI); elsewhere that one test is skipped with its reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
		echo "note: chromium not installed; the report's browser test will be skipped"

test: $(BIN)/loralab browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n 2 -q

clean:
	rm -rf $(VENV) examples/build
