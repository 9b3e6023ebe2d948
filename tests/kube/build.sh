#!/usr/bin/env bash
# Builds the Kubernetes control-plane peers the tests run against (kube-apiserver,
# kube-controller-manager, kubectl) from the k8s.io/kubernetes module at the release in
# tests/kube/version, through the Go module proxy, into a cache outside the clone:
#   ${REMORA_KUBE_CACHE:-/var/cache/remora/kube}/<version>/bin
# A no-op when the binaries are already there. Go is only a test tool here, never the product.
#
# k8s.io/kubernetes points its staging modules (k8s.io/api, apimachinery, client-go, ...) at
# directories inside its own tree, which a module that requires it cannot see; so a scratch
# module replaces each of them with its published v0.<minor>.<patch> release, the usual way
# of importing Kubernetes as a library.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
version="${KUBE_VERSION:-$(tr -d '[:space:]' < "$here/version")}"
cache="${REMORA_KUBE_CACHE:-/var/cache/remora/kube}/$version"
bin="$cache/bin"
programs=(kube-apiserver kube-controller-manager kubectl)

have_all=1
for program in "${programs[@]}"; do
    [ -x "$bin/$program" ] || have_all=0
done
if [ "$have_all" = 1 ]; then
    echo "kube $version: present in $bin"
    exit 0
fi

command -v go >/dev/null || { echo "build.sh: go is not on PATH (needed to build kube $version)" >&2; exit 1; }
# k8s.io/kubernetes v1.37 asks for Go 1.26; never let the go command fetch another toolchain.
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false
# v1.37.2 → staging modules at v0.37.2.
staging_version="v0.${version#v1.}"

started=$(date +%s)
module="$(mktemp -d "${TMPDIR:-/tmp}/remora-kube-build.XXXXXX")"
trap 'rm -rf "$module"' EXIT
cd "$module"

kube_gomod="$(go mod download -json "k8s.io/kubernetes@$version" | sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')"
[ -f "$kube_gomod" ] || { echo "build.sh: could not download k8s.io/kubernetes@$version" >&2; exit 1; }

{
    echo "module remora.test/kube-peers"
    echo
    echo "go 1.26.0"
    echo
    echo "replace ("
    # Every `k8s.io/NAME => ./staging/src/k8s.io/NAME` of Kubernetes' own go.mod.
    sed -n "s#^\s*\(k8s.io/[A-Za-z0-9._-]*\) => \./staging/src/.*#\t\1 => \1 $staging_version#p" "$kube_gomod"
    echo ")"
} > go.mod
grep -q "k8s.io/client-go => " go.mod || { echo "build.sh: found no staging modules in $kube_gomod" >&2; exit 1; }

tools=()
for program in "${programs[@]}"; do
    tools+=("k8s.io/kubernetes/cmd/$program@$version")
done
go get -tool "${tools[@]}"

minor="${version#v1.}"
minor="${minor%%.*}"
ldflags="-s -w \
 -X k8s.io/component-base/version.gitVersion=$version \
 -X k8s.io/component-base/version.gitMajor=1 \
 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/component-base/version.gitTreeState=clean"
mkdir -p "$cache"
staging="$(mktemp -d "$cache/bin.partial.XXXXXX")"
chmod 755 "$staging"
for program in "${programs[@]}"; do
    go build -trimpath -ldflags "$ldflags" -o "$staging/$program" "k8s.io/kubernetes/cmd/$program"
done
# Appears whole or not at all: a build stopped half way is rebuilt next time.
rm -rf "$bin"
mv "$staging" "$bin"
"$bin/kube-apiserver" --version
echo "kube $version: built into $bin in $(( $(date +%s) - started ))s"
