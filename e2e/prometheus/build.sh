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
# Also copies the Prometheus Operator's CRDs the tests install (PodMonitor, ServiceMonitor,
# PrometheusRule) from its Go module (MOE_PROMETHEUS_OPERATOR_VERSION) into ../crds/ (next to
# bin/).
#
# To move to another version: edit the require line (`go get github.com/prometheus/prometheus@V
# && go mod tidy` in this folder) and commit go.mod and go.sum.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VERSION="$(sed -n 's/^\tgithub.com\/prometheus\/prometheus \(v[^ ]*\).*$/\1/p' "$HERE/go.mod" | head -1)"
[[ -n "$VERSION" ]] || { echo "no prometheus version in $HERE/go.mod" >&2; exit 1; }
PO_VERSION="${MOE_PROMETHEUS_OPERATOR_VERSION:-v0.90.1}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/moe-serve/prometheus/$VERSION"
BIN="$CACHE/bin"
CRDS="$CACHE/crds"
mkdir -p "$BIN"

log() { printf '[prometheus-build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
CRD_FILES=(podmonitors servicemonitors prometheusrules)
have_all() {
    [[ -x "$BIN/prometheus" && -x "$BIN/promtool" ]] || return 1
    local c
    crds_current
}
crds_current() {
    [[ "$(cat "$CRDS/.version" 2>/dev/null)" == "$PO_VERSION" ]] || return 1
    local c
    for c in "${CRD_FILES[@]}"; do [[ -s "$CRDS/monitoring.coreos.com_$c.yaml" ]] || return 1; done
}

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
if ! crds_current; then
    log "fetching the Prometheus Operator $PO_VERSION CRDs"
    dir="$(go mod download -json "github.com/prometheus-operator/prometheus-operator@$PO_VERSION" |
        sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
    [[ -n "$dir" ]] || { log "cannot download github.com/prometheus-operator/prometheus-operator@$PO_VERSION"; exit 1; }
    tmp="$(mktemp -d "$CACHE/tmp.XXXXXX")"
    for c in "${CRD_FILES[@]}"; do cp "$dir/example/prometheus-operator-crd/monitoring.coreos.com_$c.yaml" "$tmp/"; done
    chmod u+w "$tmp"/*
    echo "$PO_VERSION" >"$tmp/.version"
    rm -rf "$CRDS" && mv "$tmp" "$CRDS"
fi
start=$SECONDS
if [[ -x "$BIN/prometheus" && -x "$BIN/promtool" ]]; then
    echo "$BIN"
    exit 0
fi
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
