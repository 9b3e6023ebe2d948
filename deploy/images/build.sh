#!/usr/bin/env bash
# Builds Remora's container images with no registry reachable: each image is FROM scratch and
# holds its binaries plus exactly the shared libraries they load (found with ldd), and for the
# init image the iptables programs, their xtables extensions and their libraries. Tags match
# the defaults of `remora-injector manifests` (docker.io/remora/<image>:latest).
#
#   deploy/images/build.sh [options] [proxy|init|control-plane|injector ...]   (default: all)
#
#   --bin-dir DIR      where the built binaries are (default: $CARGO_TARGET_DIR/release,
#                      else target/release; build them first: cargo build --release --workspace)
#   --context DIR      where to stage each image's build context (default: a temporary dir)
#   --builder NAME     buildah (default when installed), docker, or none (stage only, then
#                      e.g. docker build -t remora/proxy:latest CONTEXT/proxy)
#   --tag TAG          image tag (default: latest)
#   --archive-dir DIR  also save each image as DIR/<image>.tar (docker-archive: for
#                      `docker load -i`, `kind load image-archive`)
#   --storage DIR      buildah only: a private image store in DIR (vfs driver) instead of the
#                      system one
#
# Each image's Dockerfile (deploy/images/<image>/Dockerfile) sets its entrypoint and user.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
bin_dir="${CARGO_TARGET_DIR:-$here/../../target}/release"
context=""
builder=""
tag="latest"
archive_dir=""
storage=""
images=()
while [ $# -gt 0 ]; do
    case "$1" in
        --bin-dir) bin_dir="$2"; shift 2 ;;
        --context) context="$2"; shift 2 ;;
        --builder) builder="$2"; shift 2 ;;
        --tag) tag="$2"; shift 2 ;;
        --archive-dir) archive_dir="$2"; shift 2 ;;
        --storage) storage="$2"; shift 2 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        proxy|init|control-plane|injector) images+=("$1"); shift ;;
        *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ "${#images[@]}" -gt 0 ] || images=(proxy init control-plane injector)
if [ -z "$builder" ]; then
    if command -v buildah >/dev/null; then builder=buildah
    elif command -v docker >/dev/null; then builder=docker
    else echo "build.sh: neither buildah nor docker found (apt-get install buildah), or pass --builder none" >&2; exit 1
    fi
fi
case "$builder" in buildah|docker|none) ;; *) echo "build.sh: unknown builder $builder" >&2; exit 2 ;; esac
if [ -z "$context" ]; then
    context="$(mktemp -d "${TMPDIR:-/tmp}/remora-images.XXXXXX")"
    trap 'rm -rf "$context"' EXIT
fi
buildah=(buildah)
if [ -n "$storage" ]; then
    buildah+=(--root "$storage/root" --runroot "$storage/run" --storage-driver vfs)
fi

binaries_of() {
    case "$1" in
        proxy) echo remora-proxy ;;
        init) echo remora-init ;;
        control-plane) echo remora-cp remoractl ;;
        injector) echo remora-injector ;;
    esac
}

# Copies a file to the same path under the root, following symlinks.
copy_in() {
    local root="$1" path="$2"
    mkdir -p "$root$(dirname "$path")"
    cp -L "$path" "$root$path"
}

# Copies into the root every shared library (and the loader) that the ELF files already
# there load, as ldd resolves them on this machine.
copy_libraries() {
    local root="$1" file lib
    find "$root" -type f -print0 | while IFS= read -r -d '' file; do
        head -c 4 "$file" | grep -q 'ELF' || continue
        ldd "$file" 2>/dev/null | sed -n -e 's/.*=> \(\/[^ ]*\) .*/\1/p' -e 's/^\s*\(\/[^ ]*\) (0x.*/\1/p'
    done | sort -u | while IFS= read -r lib; do
        [ -e "$root$lib" ] || copy_in "$root" "$lib"
    done
}

stage() {
    local image="$1" root="$context/$1/rootfs" binary
    rm -rf "${context:?}/$image"
    mkdir -p "$root/usr/local/bin" "$root/usr/bin" "$root/usr/sbin" "$root/usr/lib" "$root/usr/lib64" \
        "$root/etc" "$root/tmp" "$root/run"
    # Merged /usr, as Debian: /lib/x and /usr/lib/x are one file, whichever path a program
    # was built to look in (iptables dlopens its extensions from /usr/lib/<arch>/xtables).
    local dir
    for dir in bin sbin lib lib64; do
        ln -s "usr/$dir" "$root/$dir"
    done
    chmod 1777 "$root/tmp"
    cp "$here/$image/Dockerfile" "$context/$image/Dockerfile"
    for binary in $(binaries_of "$image"); do
        [ -x "$bin_dir/$binary" ] || { echo "build.sh: $bin_dir/$binary not found (cargo build --release --workspace first, or --bin-dir)" >&2; exit 1; }
        # Debug info stays out of images; symbols stay in for backtraces and profiles.
        if command -v objcopy >/dev/null; then
            objcopy --strip-debug "$bin_dir/$binary" "$root/usr/local/bin/$binary"
        else
            cp "$bin_dir/$binary" "$root/usr/local/bin/$binary"
        fi
    done
    if [ "$image" = init ]; then
        local multi name xtables
        for multi in xtables-nft-multi xtables-legacy-multi; do
            [ -x "/usr/sbin/$multi" ] || { echo "build.sh: /usr/sbin/$multi not found (apt-get install iptables)" >&2; exit 1; }
            copy_in "$root" "/usr/sbin/$multi"
        done
        for name in iptables iptables-restore iptables-save ip6tables ip6tables-restore ip6tables-save; do
            ln -s xtables-nft-multi "$root/usr/sbin/$name"
            ln -s xtables-nft-multi "$root/usr/sbin/${name/tables/tables-nft}"
            ln -s xtables-legacy-multi "$root/usr/sbin/${name/tables/tables-legacy}"
        done
        # Match and target extensions are loaded with dlopen, which ldd cannot see.
        xtables="$(dirname "$(ldd /usr/sbin/xtables-nft-multi | sed -n 's/.*libxtables[^ ]* => \([^ ]*\) .*/\1/p')")/xtables"
        [ -d "$xtables" ] || xtables=/usr/lib/x86_64-linux-gnu/xtables
        mkdir -p "$root$xtables"
        cp -L "$xtables"/*.so "$root$xtables/"
        [ -f /etc/protocols ] && cp /etc/protocols "$root/etc/protocols"
    fi
    copy_libraries "$root"
    printf 'root:x:0:0:root:/:/nonexistent\nremora-proxy:x:1337:1337::/:/nonexistent\nnonroot:x:65532:65532::/:/nonexistent\n' > "$root/etc/passwd"
    printf 'root:x:0:\nremora-proxy:x:1337:\nnonroot:x:65532:\n' > "$root/etc/group"
    if [ "$image" = control-plane ]; then
        mkdir -p "$root/var/lib/remora-cp"
        chown 65532:65532 "$root/var/lib/remora-cp"
    fi
}

for image in "${images[@]}"; do
    name="docker.io/remora/$image:$tag"
    stage "$image"
    case "$builder" in
        buildah)
            "${buildah[@]}" build --quiet --layers=false --timestamp 0 -t "$name" "$context/$image" >/dev/null
            if [ -n "$archive_dir" ]; then
                mkdir -p "$archive_dir"
                rm -f "$archive_dir/$image.tar"
                "${buildah[@]}" push --quiet "$name" "docker-archive:$archive_dir/$image.tar:$name"
            fi
            ;;
        docker)
            docker build -q -t "$name" "$context/$image" >/dev/null
            if [ -n "$archive_dir" ]; then
                mkdir -p "$archive_dir"
                docker save -o "$archive_dir/$image.tar" "$name"
            fi
            ;;
        none) ;;
    esac
    echo "$name: $(du -sh "$context/$image/rootfs" | cut -f1) ($builder)"
done
