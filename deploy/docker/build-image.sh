#!/usr/bin/env bash
# Build deploy/docker/Dockerfile into statehouse:local with Buildah (chroot isolation)
# on a machine with no Docker engine and no container registry, then check the image.
#
#   sudo deploy/docker/build-image.sh            # from anywhere; needs root
#
# 1. Installs buildah (+ netavark) and debootstrap from Debian when they are missing.
# 2. Makes the two base images locally, as stand-ins for the public ones the Dockerfile
#    names by default (no registry is pulled from):
#      localhost/statehouse-base/debian:<release>-slim          debootstrap --variant=minbase,
#                                                                slimmed like debian:<release>-slim
#      localhost/statehouse-base/rust:<rust>-slim-<release>     that + gcc/libc6-dev/pkg-config
#                                                                + this machine's own Rust toolchain
#    and passes them to the Dockerfile as BUILDER_IMAGE / RUNTIME_IMAGE.
# 3. buildah bud --isolation=chroot --layers --format=docker from the repository root
#    (cargo inside the build fetches crates from crates.io).
# 4. Checks the image with buildah from/run (podman run does not work on such machines):
#    user, --help, --dump-config, config (HEALTHCHECK, CMD, labels, port), `statehouse
#    migrate` on the default embedded database, and `statehouse serve` answering /healthz
#    from the host and through the image's own HEALTHCHECK command.
# Prints `image statehouse:local size=NN MB` last; exits non-zero on any failure.
#
# Cache: ~/.cache/statehouse/image (STATEHOUSE_IMAGE_CACHE) keeps the debootstrap rootfs,
# buildah's RUN --mount=type=cache directories (cargo registry, target/) and logs. The
# images themselves live in the machine's containers storage (/var/lib/containers), where
# `buildah images` / `podman images` list them; the base images are rebuilt only when
# their recipe or inputs change.
#
# Settings (environment): STATEHOUSE_IMAGE (default statehouse:local),
# STATEHOUSE_IMAGE_CACHE, DEBIAN_MIRROR / DEBIAN_SECURITY_MIRROR (default: the host's
# apt sources for that release, else Debian's public ones), STATEHOUSE_RUST_SYSROOT
# (default: `rustc --print sysroot`; must be the Dockerfile's RUST_VERSION).
#
# shellcheck disable=SC2016  # single-quoted $... is meant: Go templates, in-container shells
set -Eeuo pipefail

# ----------------------------------------------------------------------------- basics

START=$SECONDS
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DOCKERFILE=$REPO/deploy/docker/Dockerfile
IMAGE=${STATEHOUSE_IMAGE:-statehouse:local}
CACHE=${STATEHOUSE_IMAGE_CACHE:-$HOME/.cache/statehouse/image}
# Bump when the way a base image is made changes, so cached ones are rebuilt.
RECIPE=1
STEP="start"
CONTAINERS=()   # working containers to remove on exit
BG_PID=""       # a background `buildah run` to stop on exit

log() { printf '==> %s\n' "$*"; }
# One FAILED message per run, even when the failure happens inside $(...): the first
# one to report leaves a mark ($$ is the script's own PID in subshells too).
FAILED_MARK=/tmp/statehouse-build-image.$$.failed
fail() {
    local rc=$1; shift
    if [[ ! -e $FAILED_MARK ]]; then
        : >"$FAILED_MARK"
        printf '\nbuild-image.sh: FAILED (%s): %s\n' "$STEP" "$*" >&2
    fi
    exit "$rc"
}
die() { fail 1 "$@"; }
on_err() {
    local rc=$? line=$1 cmd=$2
    fail "$rc" "exit $rc at line $line: $cmd"
}
trap 'on_err "$LINENO" "$BASH_COMMAND"' ERR

cleanup() {
    if [[ -n $BG_PID ]] && kill -0 "$BG_PID" 2>/dev/null; then
        stop_tree "$BG_PID" KILL
    fi
    local c
    for c in "${CONTAINERS[@]}"; do
        buildah rm "$c" >/dev/null 2>&1 || printf 'note: could not remove working container %s\n' "$c" >&2
    done
    CONTAINERS=()
    rm -f "$FAILED_MARK"
}
trap cleanup EXIT

# Processes below PID (children first), found by parent id, so only what this script
# started is signalled.
descendants() {
    local pid=$1 child
    for child in $(pgrep -P "$pid" || true); do
        descendants "$child"
        echo "$child"
    done
}
stop_tree() {
    local pid=$1 sig=$2 p
    for p in $(descendants "$pid") "$pid"; do kill -s "$sig" "$p" 2>/dev/null || true; done
}

new_container() {  # IMAGE NAME: a working container of that name (removed on exit)
    local image=$1 name=$2
    buildah rm "$name" >/dev/null 2>&1 || true   # left over by an interrupted run
    buildah from --pull=never --name "$name" "$image" >/dev/null
    CONTAINERS+=("$name")
}
forget_container() {  # NAME: no longer to be removed on exit
    local kept=() c
    for c in "${CONTAINERS[@]}"; do [[ $c == "$1" ]] || kept+=("$c"); done
    CONTAINERS=("${kept[@]+"${kept[@]}"}")
}
drop_container() {
    buildah rm "$1" >/dev/null
    forget_container "$1"
}
image_label() {  # IMAGE LABEL -> value, empty when the image or the label is missing
    buildah inspect --type image --format "{{index .OCIv1.Config.Labels \"$2\"}}" "$1" 2>/dev/null || true
}

[[ $(id -u) == 0 ]] || die "run as root: debootstrap and buildah's chroot isolation with the system storage need it"
[[ -f $DOCKERFILE ]] || die "no Dockerfile at $DOCKERFILE"
mkdir -p "$CACHE"/logs "$CACHE"/tmp
exec 9>"$CACHE"/.lock
flock -n 9 || die "another build-image.sh holds $CACHE/.lock"

# The Dockerfile's own defaults: the stand-ins carry the same tags as the public images.
dockerfile_default() {
    sed -n "s/^ARG $1=//p" "$DOCKERFILE" | head -n1
}
RUST_VERSION=$(dockerfile_default RUST_VERSION)
DEBIAN_RELEASE=$(dockerfile_default DEBIAN_RELEASE)
[[ -n $RUST_VERSION && -n $DEBIAN_RELEASE ]] || die "no ARG RUST_VERSION=/DEBIAN_RELEASE= defaults in $DOCKERFILE"
if ! grep -q '^FROM ${BUILDER_IMAGE} ' "$DOCKERFILE" || ! grep -q '^FROM ${RUNTIME_IMAGE} ' "$DOCKERFILE"; then
    die "the Dockerfile's FROM lines must be \${BUILDER_IMAGE} and \${RUNTIME_IMAGE} so the local bases can be passed in"
fi
RUNTIME_BASE=localhost/statehouse-base/debian:$DEBIAN_RELEASE-slim
BUILDER_BASE=localhost/statehouse-base/rust:$RUST_VERSION-slim-$DEBIAN_RELEASE

# ----------------------------------------------------------------------------- 1. tools

STEP="install tools"
t0=$SECONDS
# - buildah: builds the Dockerfile (bud) and runs the checks in working containers
#   (from/run/inspect). With --isolation=chroot it needs no OCI runtime (crun/runc, only
#   recommended, so not installed), no network namespace set-up and no daemon, which is
#   what works on these machines. As root its storage uses the kernel's overlayfs (or
#   picks vfs by itself where overlayfs is missing), so fuse-overlayfs, which is for
#   rootless storage, is not needed either. podman is not used: `podman run` does not
#   work here, and `buildah images` reports the size.
# - netavark: buildah sets up its network backend on every `from`, even though chroot
#   isolation then uses the host's network; netavark is Debian's default backend (only
#   recommended by buildah), and without it a storage that once recorded it as the
#   backend fails with `could not find "netavark"`.
# - debootstrap + debian-archive-keyring: make (and verify the signatures of) a Debian
#   rootfs straight from the Debian archive, in place of pulling debian:<release>-slim.
# - curl: probes the server's /healthz from the host; procps (pgrep): finds the server
#   process under `buildah run` to send it SIGTERM.
missing=()
command -v buildah >/dev/null || missing+=(buildah)
[[ -x /usr/lib/podman/netavark ]] || missing+=(netavark)
command -v debootstrap >/dev/null || missing+=(debootstrap)
[[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]] || missing+=(debian-archive-keyring)
command -v curl >/dev/null || missing+=(curl)
command -v pgrep >/dev/null || missing+=(procps)
if ((${#missing[@]})); then
    log "installing ${missing[*]} from Debian (log: $CACHE/logs/apt-install.log)"
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; } \
        >"$CACHE/logs/apt-install.log" 2>&1 \
        || die "apt-get could not install ${missing[*]}:
$(tail -n 20 "$CACHE/logs/apt-install.log")"
fi
export BUILDAH_ISOLATION=chroot
log "buildah $(buildah --version | awk '{print $3}'), storage driver $(buildah info --format '{{.store.GraphDriverName}}'), $(debootstrap --version)"

# Mirrors: the host's apt sources for this release when it has them, else Debian's own.
host_apt_uri() {  # SUITE -> the URI the host's apt uses for SUITE/main, if any
    apt-cache policy 2>/dev/null | awk -v s="$1/main" '$3 == s { print $2; exit }'
}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-$(host_apt_uri "$DEBIAN_RELEASE")}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-$(host_apt_uri "$DEBIAN_RELEASE-security")}
DEBIAN_SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

# The host toolchain that goes into the builder base: it must be the version the
# Dockerfile asks for, or the stand-in would carry a false tag.
RUST_SYSROOT=${STATEHOUSE_RUST_SYSROOT:-$(cd / && { rustc --print sysroot 2>/dev/null || true; })}
[[ -x $RUST_SYSROOT/bin/rustc && -x $RUST_SYSROOT/bin/cargo ]] \
    || die "no Rust toolchain found (rustc --print sysroot gave '$RUST_SYSROOT'); set STATEHOUSE_RUST_SYSROOT"
RUSTC_VV=$("$RUST_SYSROOT"/bin/rustc -vV)
RUSTC_RELEASE=$(sed -n 's/^release: //p' <<<"$RUSTC_VV")
RUST_HOST=$(sed -n 's/^host: //p' <<<"$RUSTC_VV")
[[ $RUSTC_RELEASE == "$RUST_VERSION" || $RUSTC_RELEASE == "$RUST_VERSION".* ]] \
    || die "the toolchain at $RUST_SYSROOT is rustc $RUSTC_RELEASE, the Dockerfile's RUST_VERSION is $RUST_VERSION; set STATEHOUSE_RUST_SYSROOT to a $RUST_VERSION toolchain"
RUSTUP_BIN=$(command -v rustup || true)
[[ -n $RUSTUP_BIN ]] || die "rustup not found: the builder base uses it as the cargo/rustc proxy, like the rust image"
RUSTUP_BIN=$(readlink -f "$RUSTUP_BIN")
log "tools ready ($((SECONDS - t0)) s); mirror $DEBIAN_MIRROR, toolchain rustc $RUSTC_RELEASE ($RUST_HOST) from $RUST_SYSROOT"

# ----------------------------------------------------------------------------- 2. base images

STEP="runtime base image"
t0=$SECONDS
ROOTFS_TAR=$CACHE/debian-$DEBIAN_RELEASE-minbase-r$RECIPE.tar
if [[ ! -s $ROOTFS_TAR ]]; then
    log "debootstrap --variant=minbase $DEBIAN_RELEASE from $DEBIAN_MIRROR (once; cached as $ROOTFS_TAR)"
    work=$(mktemp -d "$CACHE/tmp/rootfs.XXXXXX")
    debootstrap --variant=minbase --components=main \
        --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
        "$DEBIAN_RELEASE" "$work/rootfs" "$DEBIAN_MIRROR" >"$CACHE/logs/debootstrap.log" 2>&1 \
        || die "debootstrap failed; see $CACHE/logs/debootstrap.log"
    r=$work/rootfs
    # What debian:<release>-slim does on top of a minbase rootfs: no docs, man pages or
    # translations (now or in packages installed later), apt drops downloaded .debs and
    # its binary caches, keeps indexes compressed, fetches no translations.
    cat >"$r/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
    find "$r/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    find "$r/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "$r"/usr/share/{man,groff,info,lintian,linda,locale}/*
    cat >"$r/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    echo 'Acquire::Languages "none";' >"$r/etc/apt/apt.conf.d/docker-no-languages"
    echo 'Acquire::GzipIndexes "true";' >"$r/etc/apt/apt.conf.d/docker-gzip-indexes"
    echo 'Apt::AutoRemove::SuggestsImportant "false";' >"$r/etc/apt/apt.conf.d/docker-autoremove-suggests"
    # The same sources as the public image: the release, its updates and security.
    rm -f "$r/etc/apt/sources.list"
    cat >"$r/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $DEBIAN_MIRROR
Suites: $DEBIAN_RELEASE $DEBIAN_RELEASE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $DEBIAN_SECURITY_MIRROR
Suites: $DEBIAN_RELEASE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/*.bin "$r"/var/cache/apt/archives/*.deb \
        "$r"/var/log/*.log "$r"/var/log/apt/* "$r"/tmp/* "$r"/root/.bash_history
    : >"$r/etc/machine-id"
    rm -f "$r/etc/hostname" "$r/etc/resolv.conf"   # buildah provides both at run time
    tar --numeric-owner --xattrs --xattrs-include='*' -C "$r" -cf "$ROOTFS_TAR.part" .
    mv "$ROOTFS_TAR.part" "$ROOTFS_TAR"
    rm -rf "$work"
fi

runtime_key="r$RECIPE $DEBIAN_RELEASE $(stat -c '%s %Y' "$ROOTFS_TAR")"
if [[ $(image_label "$RUNTIME_BASE" statehouse.base.key) != "$runtime_key" ]]; then
    log "importing the rootfs as $RUNTIME_BASE"
    ctr=statehouse-base-runtime
    new_container scratch "$ctr"
    mnt=$(buildah mount "$ctr")
    tar --numeric-owner --xattrs --xattrs-include='*' -xpf "$ROOTFS_TAR" -C "$mnt"
    buildah umount "$ctr" >/dev/null
    buildah config --os linux --arch "$(dpkg --print-architecture)" \
        --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd '["bash"]' \
        --label statehouse.base.key="$runtime_key" \
        --label statehouse.base.stands-for="debian:$DEBIAN_RELEASE-slim" \
        "$ctr"
    buildah commit --quiet --rm "$ctr" "$RUNTIME_BASE" >/dev/null
    forget_container "$ctr"
fi
log "$RUNTIME_BASE ready ($((SECONDS - t0)) s)"

STEP="builder base image"
t0=$SECONDS
# This machine's extra CA certificates (a TLS-inspecting egress proxy, say) go into the
# builder base, so cargo inside the build can reach crates.io as the host does. Only the
# builder stage sees them; the runtime image gets Debian's ca-certificates alone.
EXTRA_CAS=()
for f in /usr/local/share/ca-certificates/*.crt; do if [[ -f $f ]]; then EXTRA_CAS+=("$f"); fi; done
ca_sum=$(cat "${EXTRA_CAS[@]+"${EXTRA_CAS[@]}"}" /dev/null | sha256sum | cut -c1-16)
runtime_id=$(buildah inspect --type image --format '{{.FromImageID}}' "$RUNTIME_BASE")
rustup_sum=$(sha256sum "$RUSTUP_BIN" | cut -c1-16)
builder_key="r$RECIPE base=${runtime_id:0:16} rustc=$RUSTC_RELEASE/$RUST_HOST rustup=$rustup_sum ca=$ca_sum"
TOOLCHAIN=$RUSTC_RELEASE-$RUST_HOST
if [[ $(image_label "$BUILDER_BASE" statehouse.base.key) != "$builder_key" ]]; then
    log "making $BUILDER_BASE: gcc, libc6-dev, pkg-config from Debian + rustc $RUSTC_RELEASE from this machine"
    ctr=statehouse-base-builder
    new_container "$RUNTIME_BASE" "$ctr"
    # What rust:<v>-slim-<release> installs besides the toolchain (gcc is the linker and
    # builds the bundled SQLite of libsql), plus pkg-config for -sys crates.
    buildah run "$ctr" -- sh -ec '
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            ca-certificates gcc libc6-dev pkg-config
        rm -rf /var/lib/apt/lists/*' >"$CACHE/logs/builder-apt.log" 2>&1 \
        || die "apt-get in the builder base failed; see $CACHE/logs/builder-apt.log"
    mnt=$(buildah mount "$ctr")
    if ((${#EXTRA_CAS[@]})); then
        cp "${EXTRA_CAS[@]}" "$mnt/usr/local/share/ca-certificates/"
        buildah run "$ctr" -- update-ca-certificates >>"$CACHE/logs/builder-apt.log" 2>&1
    fi
    # The layout of the rust image: RUSTUP_HOME=/usr/local/rustup, CARGO_HOME=/usr/local/cargo,
    # cargo/rustc/... in /usr/local/cargo/bin as rustup proxies, one toolchain named
    # <version>-<host>; without its documentation (rust-docs, ~800 MB).
    tc=$mnt/usr/local/rustup/toolchains/$TOOLCHAIN
    mkdir -p "$tc" "$mnt/usr/local/cargo/bin"
    tar -C "$RUST_SYSROOT" --exclude=./share/doc -cf - . | tar -C "$tc" -xf -
    install -m 0755 "$RUSTUP_BIN" "$mnt/usr/local/cargo/bin/rustup"
    for proxy in cargo cargo-clippy cargo-fmt clippy-driver rustc rustdoc rustfmt rust-gdb rust-gdbgui rust-lldb; do
        if [[ -e $tc/bin/$proxy ]]; then ln -sf rustup "$mnt/usr/local/cargo/bin/$proxy"; fi
    done
    cat >"$mnt/usr/local/rustup/settings.toml" <<EOF
version = "12"
default_toolchain = "$TOOLCHAIN"
profile = "minimal"

[overrides]
EOF
    chmod -R a+w "$mnt/usr/local/rustup" "$mnt/usr/local/cargo"
    buildah umount "$ctr" >/dev/null
    buildah config \
        --env RUSTUP_HOME=/usr/local/rustup \
        --env CARGO_HOME=/usr/local/cargo \
        --env PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env RUST_VERSION="$RUSTC_RELEASE" \
        --label statehouse.base.key="$builder_key" \
        --label statehouse.base.stands-for="rust:$RUST_VERSION-slim-$DEBIAN_RELEASE" \
        "$ctr"
    got=$(buildah run "$ctr" -- sh -ec 'cargo --version; rustc --version; cc --version | head -n1' 2>&1) \
        || die "the toolchain does not run in the builder base: $got"
    printf '    %s\n' "${got//$'\n'/$'\n'    }"
    buildah commit --quiet --rm "$ctr" "$BUILDER_BASE" >/dev/null
    forget_container "$ctr"
fi
log "$BUILDER_BASE ready ($((SECONDS - t0)) s)"

# ----------------------------------------------------------------------------- 3. build

STEP="image build"
t0=$SECONDS
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/Cargo.toml" | head -n1)
REVISION=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
if [[ $REVISION != unknown && -n $(git -C "$REPO" status --porcelain 2>/dev/null) ]]; then
    REVISION="$REVISION-dirty"   # the context is the working tree, changes included
fi
CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
# An http(s) origin remote names the source; otherwise the Dockerfile's default stays.
SOURCE_ARG=()
origin=$(git -C "$REPO" remote get-url origin 2>/dev/null || true)
if [[ $origin == http://* || $origin == https://* ]]; then SOURCE_ARG=(--build-arg SOURCE="$origin"); fi
BUILD_LOG=$CACHE/logs/build.log
log "buildah bud --isolation=chroot -f deploy/docker/Dockerfile -t $IMAGE $REPO (log: $BUILD_LOG)"
# TMPDIR: buildah keeps RUN --mount=type=cache directories under it (buildah-cache-<uid>),
# so the cargo registry and target/ survive between runs in the cache folder.
# --format=docker: the OCI image format has no HEALTHCHECK (buildah drops it with a warning).
# --layers: an unchanged context reuses every step; --force-rm: no working container is
# left behind by a failed step. --pull=never: only the local bases, no registry.
# The full output goes to the log; the steps, cargo's start and end and any warning or
# error are shown.
previous=$(buildah inspect --type image --format '{{.FromImageID}}' "$IMAGE" 2>/dev/null || true)
rm -f "$CACHE/tmp/bud.rc"
{
    rc=0
    TMPDIR=$CACHE/tmp buildah bud \
        --isolation=chroot --layers --force-rm --format=docker --pull=never \
        --build-arg BUILDER_IMAGE="$BUILDER_BASE" \
        --build-arg RUNTIME_IMAGE="$RUNTIME_BASE" \
        --build-arg VERSION="$VERSION" \
        --build-arg REVISION="$REVISION" \
        --build-arg CREATED="$CREATED" "${SOURCE_ARG[@]+"${SOURCE_ARG[@]}"}" \
        -f "$DOCKERFILE" -t "$IMAGE" "$REPO" || rc=$?
    echo "$rc" >"$CACHE/tmp/bud.rc"
} 2>&1 | tee "$BUILD_LOG" | grep --line-buffered -E \
    '^(\[[0-9]+/[0-9]+\] )?(STEP|COMMIT|--> Using cache|Successfully)|^ *(Compiling statehouse|Finished)|^ *(error|Error|WARN)' || true
[[ $(cat "$CACHE/tmp/bud.rc" 2>/dev/null) == 0 ]] || die "buildah bud failed; the last lines of $BUILD_LOG:
$(tail -n 30 "$BUILD_LOG")"
log "built $IMAGE ($((SECONDS - t0)) s)"
# The image this tag named before is left untagged by the new one (its CREATED label
# differs): remove it, so repeated runs do not pile up images. The layer cache stays.
current=$(buildah inspect --type image --format '{{.FromImageID}}' "$IMAGE")
if [[ -n $previous && $previous != "$current" ]]; then
    buildah rmi "$previous" >/dev/null 2>&1 || printf 'note: the previous %s (%.12s) is still in use, not removed\n' "$IMAGE" "$previous"
fi

# ----------------------------------------------------------------------------- 4. checks

STEP="image checks"
t0=$SECONDS
cfg() { buildah inspect --type image --format "$1" "$IMAGE"; }
check() {  # WHAT GO-TEMPLATE WANTED: the template applied to the image gives WANTED
    local got
    got=$(cfg "$2")
    [[ $got == "$3" ]] || die "$1: got '$got', want '$3'"
    printf '    ok  %s = %s\n' "$1" "$got"
}
check_re() {  # WHAT GO-TEMPLATE REGEX
    local got
    got=$(cfg "$2")
    [[ $got =~ $3 ]] || die "$1: '$got' does not match /$3/"
    printf '    ok  %s ~ /%s/\n' "$1" "$3"
}
expect() {  # WHAT GOT WANTED
    [[ $2 == "$3" ]] || die "$1: got '$2', want '$3'"
    printf '    ok  %s = %s\n' "$1" "$2"
}
expect_re() {  # WHAT GOT REGEX
    [[ $2 =~ $3 ]] || die "$1: '$2' does not match /$3/"
    printf '    ok  %s ~ /%s/\n' "$1" "$3"
}

log "image configuration (buildah inspect; lists shown as [item][item])"
check "User" '{{.Docker.Config.User}}' "10001:10001"
check "Cmd" '{{range .Docker.Config.Cmd}}[{{.}}]{{end}}' "[statehouse][serve]"
check "Entrypoint" '{{range .Docker.Config.Entrypoint}}[{{.}}]{{end}}' ""
check "ExposedPorts" '{{range $port, $_ := .Docker.Config.ExposedPorts}}[{{$port}}]{{end}}' "[8080/tcp]"
check "WorkingDir" '{{.Docker.Config.WorkingDir}}' "/var/lib/statehouse"
check "StopSignal" '{{.Docker.Config.StopSignal}}' "SIGTERM"
check_re "Env" '{{range .Docker.Config.Env}}[{{.}}]{{end}}' '\[STATEHOUSE_LISTEN=0\.0\.0\.0:8080\]'
check_re "Healthcheck.Test" '{{range .Docker.Config.Healthcheck.Test}}[{{.}}]{{end}}' '^\[CMD\]\[sh\]\[-c\]\[curl [^]]*/healthz[^]]*\]$'
check "Healthcheck interval, timeout, start period, retries" \
    '{{with .Docker.Config.Healthcheck}}{{.Interval}} {{.Timeout}} {{.StartPeriod}} {{.Retries}}{{end}}' "10s 3s 20s 3"
for name in title description licenses source; do
    check_re "label $name" "{{index .Docker.Config.Labels \"org.opencontainers.image.$name\"}}" '.'
done
label() { printf '{{index .Docker.Config.Labels "org.opencontainers.image.%s"}}' "$1"; }
check "label version" "$(label version)" "$VERSION"
check "label revision" "$(label revision)" "$REVISION"
check "label created" "$(label created)" "$CREATED"
check "label base.name" "$(label base.name)" "$RUNTIME_BASE"

ctr=statehouse-check
new_container "$IMAGE" "$ctr"
log "commands in the image, as its user (buildah run)"
ids=$(buildah run "$ctr" -- sh -c 'echo "$(id -u):$(id -g)"' 2>&1) || die "buildah run in $IMAGE failed: $ids"
expect "id -u:id -g" "$ids" "10001:10001"
help=$(buildah run "$ctr" -- statehouse --help 2>&1) || die "statehouse --help failed: $help"
expect_re "statehouse --help" "$help" 'serve'
dump=$(buildah run "$ctr" -- statehouse --dump-config 2>&1) || die "statehouse --dump-config failed: $dump"
expect_re "--dump-config listen" "$dump" '"listen": "0\.0\.0\.0:8080"'
expect_re "--dump-config turso_url" "$dump" '"turso_url": "file:\./data/statehouse\.db"'
# The default embedded database is /var/lib/statehouse/data/statehouse.db: the image's
# user must be able to create it.
migrate=$(buildah run "$ctr" -- statehouse migrate 2>&1) || die "statehouse migrate (default database) failed: $migrate"
expect_re "statehouse migrate" "$migrate" 'is migrated'
owner=$(buildah run "$ctr" -- stat -c '%u:%g' /var/lib/statehouse/data/statehouse.db)
expect "owner of data/statehouse.db" "$owner" "10001:10001"
bin=$(buildah run "$ctr" -- stat -c '%u %a' /usr/local/bin/statehouse)
expect "owner, mode of /usr/local/bin/statehouse" "$bin" "0 755"

# A free port on the host: chroot isolation shares the host's network namespace.
PORT=""
for p in $(shuf -i 20000-60000 -n 50); do
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then PORT=$p; break; fi
done
[[ -n $PORT ]] || die "no free port found on 127.0.0.1"
SERVE_LOG=$CACHE/logs/serve.log
log "statehouse serve on 127.0.0.1:$PORT in the container (log: $SERVE_LOG)"
buildah run --env TURSO_URL=file:/tmp/x.db --env STATEHOUSE_LISTEN="127.0.0.1:$PORT" "$ctr" -- \
    statehouse serve >"$SERVE_LOG" 2>&1 &
BG_PID=$!
healthy=""
for _ in $(seq 1 120); do
    if body=$(curl -fsS --max-time 2 "http://127.0.0.1:$PORT/healthz" 2>/dev/null); then healthy=1; break; fi
    kill -0 "$BG_PID" 2>/dev/null || die "statehouse serve exited before answering /healthz:
$(tail -n 20 "$SERVE_LOG")"
    sleep 0.5
done
[[ -n $healthy ]] || die "no answer on http://127.0.0.1:$PORT/healthz within 60 s:
$(tail -n 20 "$SERVE_LOG")"
printf '    ok  GET /healthz from the host: %s\n' "$body"
ready=$(curl -sS --max-time 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/readyz")
expect "GET /readyz status" "$ready" "200"
# The image's own HEALTHCHECK command, run in a second container of the image with the
# same STATEHOUSE_LISTEN (it derives the port from it).
mapfile -d '' -t hc < <(cfg '{{range $i, $a := .Docker.Config.Healthcheck.Test}}{{if $i}}{{$a}}{{"\x00"}}{{end}}{{end}}')
((${#hc[@]})) || die "no HEALTHCHECK command in the image"
ctr2=statehouse-check-health
new_container "$IMAGE" "$ctr2"
out=$(buildah run --env STATEHOUSE_LISTEN="127.0.0.1:$PORT" "$ctr2" -- "${hc[@]}" 2>&1) \
    || die "the image's HEALTHCHECK command failed against the running server: $out"
printf '    ok  HEALTHCHECK command exits 0 in the image\n'
drop_container "$ctr2"
# SIGTERM to the server (not to buildah): it drains and exits 0.
server_pid=""
for p in $(descendants "$BG_PID"); do
    if [[ $(cat /proc/"$p"/comm 2>/dev/null) == statehouse ]]; then server_pid=$p; fi
done
[[ -n $server_pid ]] || die "cannot find the statehouse process under buildah run ($BG_PID)"
kill -TERM "$server_pid"
for _ in $(seq 1 60); do kill -0 "$BG_PID" 2>/dev/null || break; sleep 0.5; done
if kill -0 "$BG_PID" 2>/dev/null; then die "statehouse serve did not stop within 30 s of SIGTERM"; fi
rc=0; wait "$BG_PID" || rc=$?
BG_PID=""
expect "exit status after SIGTERM" "$rc" "0"
expect_re "serve log" "$(cat "$SERVE_LOG")" 'shutdown requested'
drop_container "$ctr"
log "checks passed ($((SECONDS - t0)) s)"

# ----------------------------------------------------------------------------- size

STEP="image size"
size=$(buildah images --format '{{.Size}}' "$IMAGE" | head -n1)
[[ -n $size ]] || die "buildah images shows no $IMAGE"
log "total $((SECONDS - START)) s"
num=${size% *} unit=${size##* }
case $unit in
    MB) mb=$num ;;
    kB) mb=$(awk -v n="$num" 'BEGIN { printf "%.1f", n / 1000 }') ;;
    GB) mb=$(awk -v n="$num" 'BEGIN { printf "%.0f", n * 1000 }') ;;
    *) die "unexpected size '$size' from buildah images" ;;
esac
echo "image $IMAGE size=$mb MB"
