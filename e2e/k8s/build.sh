#!/usr/bin/env bash
# Builds the official Kubernetes control-plane binaries, etcd, kubectl and helm from their Go
# modules into a per-version cache outside the clone:
#
#   ${XDG_CACHE_HOME:-$HOME/.cache}/moe-serve/k8s/<k8s-version>/bin/
#     helm etcd kube-apiserver kube-controller-manager kube-scheduler kubectl registry
#
# Idempotent (a binary that exists is kept), atomic (each binary is built into a temporary
# folder and renamed into place), and serialised by a lock so two test processes never build at
# once. Prints the bin folder on stdout as its last line; progress goes to stderr.
#
# Versions (override with the environment): MOE_K8S_VERSION, MOE_ETCD_VERSION, MOE_HELM_VERSION,
# MOE_REGISTRY_VERSION (the CNCF distribution registry the image tests push to).
set -euo pipefail

K8S_VERSION="${MOE_K8S_VERSION:-v1.37.2}"
ETCD_VERSION="${MOE_ETCD_VERSION:-v3.7.3}"
HELM_VERSION="${MOE_HELM_VERSION:-v3.22.0}"
REGISTRY_VERSION="${MOE_REGISTRY_VERSION:-v3.1.2}"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/moe-serve/k8s/${K8S_VERSION}"
BIN="$CACHE/bin"
WORK="$CACHE/work"
mkdir -p "$BIN" "$WORK"

log() { printf '[k8s-build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

KUBE_BINS=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
# Each binary has a stamp file with the version it was built from, so changing a version
# rebuilds just that binary.
want_version() {
    case "$1" in
        helm) echo "$HELM_VERSION" ;;
        registry) echo "$REGISTRY_VERSION" ;;
        etcd) echo "$ETCD_VERSION" ;;
        *) echo "$K8S_VERSION" ;;
    esac
}
built() { [[ -x "$BIN/$1" && "$(cat "$BIN/.$1.version" 2>/dev/null)" == "$(want_version "$1")" ]]; }
have_all() {
    local b
    for b in helm etcd registry "${KUBE_BINS[@]}"; do built "$b" || return 1; done
}
if [[ "${1:-}" != "--update-modules" ]] && have_all; then
    echo "$BIN"
    exit 0
fi

command -v go >/dev/null || { log "Go is needed to build the Kubernetes binaries (go1.26+)"; exit 1; }

exec 9>"$CACHE/.lock"
if ! flock -n 9; then
    log "another process is building into $CACHE; waiting for its lock"
    flock 9
fi
# Temporary folders of a build that was killed.
rm -rf "$CACHE"/tmp.*

export CGO_ENABLED=0
export GOFLAGS="-buildvcs=false"
# A shared machine has two cores: keep the build from starving everything else.
export GOMAXPROCS="${GOMAXPROCS:-2}"
BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)"

# Moves freshly built binaries from a temporary folder into $BIN (rename is atomic).
install_from() {
    local tmp="$1" b
    for b in "$tmp"/*; do
        chmod +x "$b"
        mv -f "$b" "$BIN/$(basename "$b")"
        want_version "$(basename "$b")" >"$BIN/.$(basename "$b").version"
    done
    rm -rf "$tmp"
}

# The folder of a downloaded module (module@version).
module_dir() { go mod download -json "$1" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p'; }

# --- helm: no replace directives, so `go install` works as is. --------------------------------
if ! built helm; then
    start=$SECONDS
    log "building helm $HELM_VERSION"
    helm_dir="$(module_dir "helm.sh/helm/v3@$HELM_VERSION")"
    # helm stamps the Kubernetes version its client libraries speak (its Makefile does the same).
    kver="$(sed -n 's/^\tk8s.io\/client-go v0\.\([0-9]*\)\..*/\1/p' "$helm_dir/go.mod")"
    tmp="$(mktemp -d "$CACHE/tmp.XXXXXX")"
    GOBIN="$tmp" go install -trimpath -ldflags "-s -w \
        -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION \
        -X helm.sh/helm/v3/internal/version.gitTreeState=clean \
        -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 \
        -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$kver \
        -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 \
        -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$kver" \
        "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
    install_from "$tmp"
    log "helm built in $((SECONDS - start))s"
fi

# --- registry: the CNCF distribution registry, also a plain `go install`. ---------------------
if ! built registry; then
    start=$SECONDS
    log "building the distribution registry $REGISTRY_VERSION"
    tmp="$(mktemp -d "$CACHE/tmp.XXXXXX")"
    GOBIN="$tmp" go install -trimpath -ldflags "-s -w \
        -X github.com/distribution/distribution/v3/version.version=$REGISTRY_VERSION" \
        "github.com/distribution/distribution/v3/cmd/registry@$REGISTRY_VERSION"
    install_from "$tmp"
    log "registry built in $((SECONDS - start))s"
fi

# --- The wrapper modules. etcd's server/v3 is a main package whose go.mod has replace
# directives, and k8s.io/kubernetes requires its ~30 staging modules at v0.0.0 and replaces them
# with ./staging; replace directives of a dependency are ignored, so each is built from a module
# of ours that requires it and (for kubernetes) names every staging module at its released
# v0.<minor>.<patch>, derived from kubernetes' own go.mod. They are committed under e2e/k8s/
# (go.mod + go.sum: the whole dependency graph pinned and checksummed); `build.sh
# --update-modules` regenerates them after a version change. An overridden version that the
# committed module does not name is generated into the cache instead.

# Writes the etcd wrapper module into $1.
gen_etcd_module() (
    mkdir -p "$1" && cd "$1"
    rm -f go.mod go.sum
    printf 'module moe-serve.dev/e2e/etcd\n\ngo 1.26\n\ntool go.etcd.io/etcd/server/v3\n' >go.mod
    go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2
    go mod tidy >&2
)

# Writes the kubernetes wrapper module into $1.
gen_kube_module() (
    k8s_dir="$(module_dir "k8s.io/kubernetes@$K8S_VERSION")"
    if grep -q '^go 1\.2[7-9]' "$k8s_dir/go.mod"; then
        log "warning: $K8S_VERSION's go.mod needs $(grep '^go ' "$k8s_dir/go.mod"); set GOTOOLCHAIN or MOE_K8S_VERSION"
    fi
    staging_version="v0.${K8S_VERSION#v1.}"
    mkdir -p "$1" && cd "$1"
    rm -f go.mod go.sum
    {
        echo "module moe-serve.dev/e2e/kubernetes"
        echo
        echo "go 1.26"
        echo
        # Only the main module's godebug lines count: copy kubernetes' own.
        awk '/^godebug \(/{p=1} p{print} p&&/^\)/{p=0} /^godebug [^(]/{print}' "$k8s_dir/go.mod"
        echo
        echo "replace ("
        sed -n 's/^\t\(k8s\.io\/[^ ]*\) v0\.0\.0$/\1/p' "$k8s_dir/go.mod" | sort -u |
            while read -r m; do printf '\t%s => %s %s\n' "$m" "$m" "$staging_version"; done
        echo ")"
        echo
        echo "tool ("
        for b in "${KUBE_BINS[@]}"; do printf '\tk8s.io/kubernetes/cmd/%s\n' "$b"; done
        echo ")"
    } >go.mod
    go get "k8s.io/kubernetes@$K8S_VERSION" >&2
    go mod tidy >&2
)

# The folder to build $1 (etcd|kubernetes) in: a copy of the committed module when it names
# the wanted version ($2 is the require line to look for), else a freshly generated one.
module_for() {
    local name="$1" want="$2" dir="$WORK/$1"
    rm -rf "$dir" && mkdir -p "$dir"
    if grep -qF "$want" "$HERE/$name/go.mod" 2>/dev/null; then
        cp "$HERE/$name/go.mod" "$HERE/$name/go.sum" "$dir/"
    else
        log "e2e/k8s/$name/go.mod does not name $want: generating the module"
        "gen_${name/kubernetes/kube}_module" "$dir"
    fi
    echo "$dir"
}

if [[ "${1:-}" == "--update-modules" ]]; then
    gen_etcd_module "$HERE/etcd"
    gen_kube_module "$HERE/kubernetes"
    log "updated $HERE/etcd and $HERE/kubernetes"
    exit 0
fi

if ! built etcd; then
    start=$SECONDS
    log "building etcd $ETCD_VERSION"
    mod="$(module_for etcd "go.etcd.io/etcd/server/v3 $ETCD_VERSION")"
    tmp="$(mktemp -d "$CACHE/tmp.XXXXXX")"
    (cd "$mod" && go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3)
    install_from "$tmp"
    log "etcd built in $((SECONDS - start))s"
fi

missing=()
for b in "${KUBE_BINS[@]}"; do built "$b" || missing+=("$b"); done
if ((${#missing[@]})); then
    start=$SECONDS
    log "building ${missing[*]} $K8S_VERSION (the longest step: about 20 minutes on 2 cores)"
    mod="$(module_for kubernetes "k8s.io/kubernetes $K8S_VERSION")"
    major="${K8S_VERSION#v}" && major="${major%%.*}"
    minor="${K8S_VERSION#v*.}" && minor="${minor%%.*}"
    ldflags="-s -w"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
        ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$BUILD_DATE"
    done
    pkgs=()
    for b in "${missing[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
    tmp="$(mktemp -d "$CACHE/tmp.XXXXXX")"
    (cd "$mod" && go build -trimpath -ldflags "$ldflags" -o "$tmp/" "${pkgs[@]}")
    install_from "$tmp"
    log "${missing[*]} built in $((SECONDS - start))s"
fi

have_all
log "all binaries in $BIN ($(du -sh "$BIN" | cut -f1))"
echo "$BIN"
