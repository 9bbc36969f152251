#!/usr/bin/env bash
# A libSQL server binary (sqld, crate libsql-server, MIT) for the tests that run
# on one; prints its path on the last line. Needs nothing outside the repository.
# In order:
#   1. SQLD_BIN, when set;
#   2. the cached build, $SQLD_CACHE/bin/sqld (default ~/.cache/statehouse-sqld),
#      when it was built from the pinned revision below;
#   3. SQLD_SOURCE: a source package cut from that revision (the libsql workspace
#      as a .tar.gz, its four git dependencies under .gitdeps/), built once into
#      the cache;
#   4. otherwise `cargo install --git` of libsql-server from the upstream
#      repository (or a mirror named by SQLD_GIT) at the pinned revision, once,
#      into the cache (SQLD_CACHE to put it elsewhere).
# Steps 3 and 4 run one and the same `cargo install --git ... --locked`: for a
# package, against a local git repository made from it, with its .gitdeps/
# standing in for the git hosts (cargo source replacement). So a machine that
# cannot reach the git host still exercises the command one that can runs.
#
#   scripts/sqld.sh              # path of sqld, building it first if needed
#   scripts/sqld.sh --check-git  # step 4's command against a repository made from SQLD_SOURCE
#
# Needs cargo, git and a C compiler. A cold build takes about 10 minutes on 2
# cores and 1.1 GB under $SQLD_CACHE/target; later builds share that target.
set -euo pipefail

# The upstream revision, and the SHA-256 of the package cut from it
# (sqld-src-f8fb14f3.tar.gz, libsql-server 0.24.33). Change them together.
SQLD_REPO=${SQLD_GIT:-https://github.com/tursodatabase/libsql}
PINNED_REV=f8fb14f3638e44edf3dbace489618c7768daee55
PINNED_PACKAGE_SHA256=96fd19f01fb758db9a4fb92336fb20fe81a4b1dc09278be1fa96135b07e6dc16
SQLD_VERSION=0.24.33

cache=${SQLD_CACHE:-$HOME/.cache/statehouse-sqld}
bin="$cache/bin/sqld"
stamp="$cache/bin/stamp"

say() { echo "[sqld] $*" >&2; }
die() { echo "error: $*" >&2; exit 1; }

# What a usable cached build's stamp says: the revision (built from git) or the
# first 16 hex digits of the package's SHA-256 (built from the package; the
# same stamp the package's own build script writes, so both share the cache).
cached_build_is_pinned() {
    [ -x "$bin" ] || return 1
    case "$(cat "$stamp" 2>/dev/null)" in
        "$PINNED_REV" | "${PINNED_PACKAGE_SHA256:0:16}") return 0 ;;
        *) return 1 ;;
    esac
}

# One cargo command for both sources. RUSTFLAGS as upstream's .cargo/config.toml
# has them (cargo install reads no configuration from the installed repository);
# the toolchain is the stable one whatever directory this runs in.
install_from_git() { # url rev install-root [cargo args...]
    local url=$1 rev=$2 root=$3
    shift 3
    mkdir -p "$cache/target"
    RUSTFLAGS="--cfg tokio_unstable ${RUSTFLAGS:-}" CARGO_TARGET_DIR="$cache/target" \
        RUSTUP_TOOLCHAIN="${RUSTUP_TOOLCHAIN:-stable}" \
        cargo install --git "$url" --rev "$rev" libsql-server --bin sqld --locked --root "$root" "$@" >&2
}

# A git repository made from the package (without .gitdeps/), at a path and with
# a commit id that stay the same from run to run: cargo's checkout of it, and so
# every build unit in the shared target, is then reused. Sets repo_url, repo_rev
# and replace_config (cargo configuration pointing the git dependencies at the
# package's copies).
prepare_package_repo() {
    local package=$1 sum dir
    [ -f "$package" ] || die "SQLD_SOURCE=$package is not a file"
    sum=$(sha256sum "$package" | cut -d' ' -f1)
    [ "$sum" = "$PINNED_PACKAGE_SHA256" ] ||
        die "SQLD_SOURCE=$package is not the package of libsql $PINNED_REV (its SHA-256 is $sum, expected $PINNED_PACKAGE_SHA256); scripts/sqld.sh pins both"
    dir="$cache/from-package/${sum:0:16}"
    repo_url="file://$dir/tree"
    replace_config="$dir/cargo-sources.toml"
    if [ -f "$dir/ready" ]; then
        repo_rev=$(cat "$dir/ready")
        return
    fi
    say "making a git repository from $package in $dir"
    rm -rf "$dir"
    mkdir -p "$dir/tree" "$dir/gitdeps"
    tar xzf "$package" -C "$dir/tree" --strip-components=1
    local crate name
    # Every crate under .gitdeps/ becomes one entry of a directory source; an
    # empty checksum list is what cargo accepts for sources without checksums (git).
    while IFS= read -r crate; do
        crate=$(dirname "$crate")
        name=$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$crate/Cargo.toml" | head -n 1)
        cp -a "$crate" "$dir/gitdeps/$name"
        echo '{"files":{},"package":null}' >"$dir/gitdeps/$name/.cargo-checksum.json"
    done < <(find "$dir/tree/.gitdeps" -name Cargo.toml -not -path '*/examples/*' -not -path '*/tests/*' | sort)
    rm -rf "$dir/tree/.gitdeps"
    {
        echo "# libsql's git dependencies, from the package instead of their hosts."
        local source url query n=0
        while IFS= read -r source; do
            url=${source#git+}
            url=${url%%#*}
            query=${url#*\?}
            url=${url%%\?*}
            n=$((n + 1))
            echo "[source.sqld-git-$n]"
            echo "git = \"$url\""
            echo "${query%%=*} = \"${query#*=}\""
            echo "replace-with = \"sqld-gitdeps\""
        done < <(grep -o '"git+[^"]*"' "$dir/tree/Cargo.lock" | tr -d '"' | sort -u)
        echo "[source.sqld-gitdeps]"
        echo "directory = \"$dir/gitdeps\""
    } >"$replace_config"
    # Fixed names and dates: the same package always gives the same commit.
    (
        cd "$dir/tree"
        export GIT_CONFIG_GLOBAL=/dev/null GIT_CONFIG_NOSYSTEM=1
        export GIT_AUTHOR_NAME=package GIT_AUTHOR_EMAIL=package@localhost GIT_AUTHOR_DATE=2000-01-01T00:00:00Z
        export GIT_COMMITTER_NAME=package GIT_COMMITTER_EMAIL=package@localhost GIT_COMMITTER_DATE=2000-01-01T00:00:00Z
        git init -q -b main .
        git add -f -A .
        git commit -q -m "libsql $PINNED_REV, from $(basename "$package")"
    )
    repo_rev=$(git -C "$dir/tree" rev-parse HEAD)
    echo "$repo_rev" >"$dir/ready"
}

build_into_cache() { # url rev stamp [cargo args...]
    local url=$1 rev=$2 mark=$3
    shift 3
    local root="$cache/install"
    rm -rf "$root"
    # Explicit checks: callers test this function's status, which turns errexit off inside it.
    install_from_git "$url" "$rev" "$root" "$@" || return 1
    mkdir -p "$cache/bin" && cp "$root/bin/sqld" "$bin.tmp" && mv "$bin.tmp" "$bin" && echo "$mark" >"$stamp"
}

# The git path against a repository made from SQLD_SOURCE, into a fresh install
# root (so cargo really builds and installs), then the binary must run and serve.
check_git_path() {
    [ -n "${SQLD_SOURCE:-}" ] || die "--check-git needs SQLD_SOURCE (the package to make a git repository from)"
    prepare_package_repo "$SQLD_SOURCE"
    local port version
    # Globals: the EXIT trap runs after this function has returned.
    check_tmp=$(mktemp -d)
    trap 'kill "${sqld_pid:-}" 2>/dev/null || true; rm -rf "$check_tmp"' EXIT
    local tmp=$check_tmp
    say "cargo install --git $repo_url --rev $repo_rev (the upstream command, sources replaced by the package's)"
    install_from_git "$repo_url" "$repo_rev" "$tmp/root" --config "$replace_config"
    version=$("$tmp/root/bin/sqld" --version)
    case "$version" in
        *"$SQLD_VERSION"*) ;;
        *) die "the sqld installed through git says \"$version\", expected version $SQLD_VERSION" ;;
    esac
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$tmp/root/bin/sqld" --http-listen-addr "127.0.0.1:$port" -d "$tmp/data" --no-welcome >"$tmp/log" 2>&1 &
    sqld_pid=$!
    for _ in $(seq 100); do
        if curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1; then
            say "ok: $version, built through cargo install --git, serves /health"
            return 0
        fi
        sleep 0.1
    done
    cat "$tmp/log" >&2
    die "the sqld installed through git did not answer /health on 127.0.0.1:$port"
}

if [ "${1:-}" = "--check-git" ]; then
    mkdir -p "$cache"
    exec 9>"$cache/.lock"
    flock 9
    check_git_path
    exit 0
elif [ $# -gt 0 ]; then
    die "usage: scripts/sqld.sh [--check-git]"
fi

if [ -n "${SQLD_BIN:-}" ]; then
    [ -x "$SQLD_BIN" ] || die "SQLD_BIN=$SQLD_BIN is not an executable file"
    echo "$SQLD_BIN"
    exit 0
fi
if cached_build_is_pinned; then
    echo "$bin"
    exit 0
fi
mkdir -p "$cache"
exec 9>"$cache/.lock" # one build at a time (the package's own build script takes the same lock)
flock 9
if cached_build_is_pinned; then
    echo "$bin"
    exit 0
fi
if [ -n "${SQLD_SOURCE:-}" ]; then
    prepare_package_repo "$SQLD_SOURCE"
    say "building sqld from $SQLD_SOURCE (once, about 10 minutes; cached in $cache)"
    build_into_cache "$repo_url" "$repo_rev" "${PINNED_PACKAGE_SHA256:0:16}" --config "$replace_config" ||
        die "cannot build sqld from SQLD_SOURCE=$SQLD_SOURCE (cargo's error above)"
else
    say "building sqld from $SQLD_REPO at $PINNED_REV (once, about 10 minutes; cached in $cache)"
    build_into_cache "$SQLD_REPO" "$PINNED_REV" "$PINNED_REV" ||
        die "cannot build sqld from $SQLD_REPO at $PINNED_REV (cargo's error above). Without that git host, set SQLD_SOURCE to a source package of that revision, or SQLD_BIN to a sqld binary"
fi
echo "$bin"
