# Sourced by ./scripts/demo and ./scripts/test: makes .venv at the repo root (idempotent) and
# installs elastickit editable with the extras named in $EK_EXTRAS. Seconds when up to date.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY_SYS="${PYTHON:-python3}"

if ! "$PY_SYS" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
  echo "elastickit needs Python >= 3.11; set PYTHON to one (found: $("$PY_SYS" --version 2>&1))." >&2
  exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV" >&2
  "$PY_SYS" -m venv "$VENV"
fi
PY="$VENV/bin/python"
# DeepSpeed JIT-builds ops into this folder; a shared cache from another version breaks it.
export TORCH_EXTENSIONS_DIR="$VENV/torch_extensions"

stamp="$VENV/.elastickit-install"
want_hash="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/_env.sh" | sha256sum | cut -c1-16)"
want="$want_hash ${EK_EXTRAS:-}"
have="$(cat "$stamp" 2>/dev/null || true)"
# Up to date when the same pyproject was installed with these extras; a run that needs no
# extras is also content with an install that had some.
up_to_date=0
if [ "$have" = "$want" ]; then up_to_date=1; fi
if [ -z "${EK_EXTRAS:-}" ] && [ "${have%% *}" = "$want_hash" ]; then up_to_date=1; fi
if [ "$up_to_date" = 0 ]; then
  pipq=("$PY" -m pip install --disable-pip-version-check -q)
  # Keep a torch the user already has (e.g. a CUDA build); otherwise pin the CPU build:
  # any looser spec makes pip download a multi-GB CUDA wheel.
  if ! "$PY" -c 'import torch, sys; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if v >= (2, 6) else 1)' 2>/dev/null; then
    echo "installing torch==2.13.0 (CPU)" >&2
    "${pipq[@]}" "torch==2.13.0" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
    "$PY" -c 'import torch' || { echo "torch failed to install" >&2; exit 1; }
  fi
  spec="$ROOT"
  [ -n "${EK_EXTRAS:-}" ] && spec="$ROOT[${EK_EXTRAS}]"
  echo "installing elastickit${EK_EXTRAS:+[$EK_EXTRAS]} (editable)" >&2
  DS_BUILD_OPS=0 "${pipq[@]}" -e "$spec" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
  "$PY" -c 'import elastickit.checkpoint' || { echo "elastickit failed to install" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
# The dashboard's browser tests drive Debian's chromium through chromium-driver (Selenium). CI
# runs as root on a fresh machine: install them once when missing; elsewhere the tests skip.
if [[ ",${EK_EXTRAS:-}," == *",dev,"* ]] && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing chromium and chromium-driver (apt-get) for the dashboard's browser tests" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
      >/dev/null 2>&1 || echo "apt-get could not install chromium; the browser tests will be skipped" >&2
  else
    echo "chromium/chromedriver are missing and apt-get is not usable here; the browser tests will be skipped" >&2
  fi
fi
