#!/usr/bin/env bash
# Render a fedtrain report (report.html) once in headless Chromium and save a screenshot, to check by
# eye how it looks. Not part of `make test`. Needs Chromium (Debian: apt-get install chromium).
#
#   scripts/render_report.sh RUN_DIR/report.html [OUT.png] [WIDTH] [HEIGHT]
#
# The page is opened from disk with no network (loopback only, when network namespaces are
# available) and a throw-away profile; a report that needed anything from outside would show it.
set -euo pipefail
if [ $# -lt 1 ] || [ ! -f "$1" ]; then
  echo "usage: $0 REPORT.html [OUT.png] [WIDTH] [HEIGHT]  (write one with: fedtrain report RUN_DIR)" >&2
  exit 2
fi
report="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
out="${2:-${report%.html}.png}"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
width="${3:-1200}"
height="${4:-7000}"
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
if [ -z "$browser" ]; then
  echo "no Chromium found; install it (Debian: apt-get install chromium) and run this again" >&2
  exit 2
fi
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
"$(dirname "$0")/loopback-only" "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars \
  --disable-background-networking --disable-component-update --disable-sync --no-first-run \
  --no-default-browser-check --disable-extensions --user-data-dir="$profile" \
  --window-size="$width,$height" --screenshot="$out" "file://$report" 2>"$profile/chromium.log" || {
  cat "$profile/chromium.log" >&2
  exit 1
}
echo "wrote $out (${width}x${height}); look at it, e.g. with an image viewer"
