#!/usr/bin/env bash
# Builds Prometheus and promtool from the Prometheus Go module into a per-version cache outside
# the clone:
#
#   ${XDG_CACHE_HOME:-$HOME/.cache}/moe-serve/prometheus/<module-version>/bin/{prometheus,promtool}
#
# from the wrapper module committed next to this script (go.mod + go.sum pin the whole graph;
# both commands are `tool` directives). Service discovery is cut down to Kubernetes' with the
# module's own build tags (remove_all_sd, enable_kubernetes_sd), and the web UI's assets are
# not embedded (the API is all the tests use). Idempotent, atomic (built into a temporary folder
# and renamed), serialised by a lock; prints the bin folder as its last line on stdout.
#
# To move to another version: edit the require line (`go get github.com/prometheus/prometheus@V
# && go mod tidy` in this folder) and commit go.mod and go.sum.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VERSION="$(sed -n 's/^\tgithub.com\/prometheus\/prometheus \(v[^ ]*\).*$/\1/p' "$HERE/go.mod" | head -1)"
[[ -n "$VERSION" ]] || { echo "no prometheus version in $HERE/go.mod" >&2; exit 1; }
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/moe-serve/prometheus/$VERSION"
BIN="$CACHE/bin"
mkdir -p "$BIN"

log() { printf '[prometheus-build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
have_all() { [[ -x "$BIN/prometheus" && -x "$BIN/promtool" ]]; }

if have_all; then
    echo "$BIN"
    exit 0
fi
command -v go >/dev/null || { log "Go is needed to build Prometheus (go1.26+)"; exit 1; }
exec 9>"$CACHE/.lock"
if ! flock -n 9; then
    log "another process is building into $CACHE; waiting for its lock"
    flock 9
fi
if have_all; then
    echo "$BIN"
    exit 0
fi
rm -rf "$CACHE"/tmp.*

export CGO_ENABLED=0 GOFLAGS="-buildvcs=false" GOMAXPROCS="${GOMAXPROCS:-2}"
start=$SECONDS
log "building prometheus and promtool $VERSION (about 2 minutes on 2 cores)"
tmp="$(mktemp -d "$CACHE/tmp.XXXXXX")"
(cd "$HERE" && go build -trimpath -ldflags "-s -w \
    -X github.com/prometheus/common/version.Version=$VERSION" \
    -tags "remove_all_sd,enable_kubernetes_sd" -o "$tmp/" \
    github.com/prometheus/prometheus/cmd/prometheus github.com/prometheus/prometheus/cmd/promtool)
for b in "$tmp"/*; do mv -f "$b" "$BIN/"; done
rm -rf "$tmp"
log "built in $((SECONDS - start))s"
echo "$BIN"
